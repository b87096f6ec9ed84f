"""Dense CLIP features: no crop, interpolated positions, same tokens as the backbone."""

import pytest
import torch
import torch.nn.functional as F

from g4seg_core.models.clip_features import DenseCLIPFeatures, interpolate_position_grid
from g4seg_core.errors import G4SegError


def _tiny_open_clip():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                             output_dim=16).eval()


def _tiny_hf():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    return CLIPVisionModelWithProjection(config).eval()


def test_open_clip_dense_tokens_equal_backbone_tokens_at_native_size():
    visual = _tiny_open_clip()
    dense = DenseCLIPFeatures.from_open_clip(visual)
    images = torch.rand(2, 3, 32, 32)
    feats = dense(images)
    assert feats.shape == (2, 16, 4, 4)
    assert torch.allclose(feats.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    visual.output_tokens = True
    pixels = (images - dense.mean) / dense.std
    _, tokens = visual(pixels)
    want = F.normalize((tokens @ visual.proj).transpose(1, 2).reshape(2, 16, 4, 4), dim=1)
    assert torch.allclose(feats, want, atol=1e-4)


def test_open_clip_larger_input_interpolates_positions_without_crop():
    dense = DenseCLIPFeatures.from_open_clip(_tiny_open_clip())
    feats = dense(torch.rand(1, 3, 64, 96))
    assert feats.shape == (1, 16, 8, 12)  # whole image, patch grid follows the aspect ratio


def test_transformers_dense_features():
    model = _tiny_hf()
    dense = DenseCLIPFeatures.from_transformers(model)
    images = torch.rand(1, 3, 32, 32)
    feats = dense(images)
    assert feats.shape == (1, 16, 4, 4)
    pixels = (images - dense.mean) / dense.std
    hidden = model.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    want = F.normalize(model.visual_projection(model.vision_model.post_layernorm(hidden)), dim=-1)
    assert torch.allclose(feats[0].flatten(1).t(), want[0], atol=1e-4)
    assert dense(torch.rand(1, 3, 64, 64)).shape == (1, 16, 8, 8)


def test_position_interpolation_identity_and_shape():
    pos = torch.randn(16, 8)
    assert torch.equal(interpolate_position_grid(pos, (4, 4), (4, 4)), pos)
    assert interpolate_position_grid(pos, (4, 4), (6, 8)).shape == (48, 8)


def test_bad_inputs():
    dense = DenseCLIPFeatures.from_open_clip(_tiny_open_clip())
    with pytest.raises(G4SegError, match="RGB"):
        dense(torch.rand(1, 1, 32, 32))
    with pytest.raises(G4SegError, match="NaN"):
        dense(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(G4SegError, match="ViT"):
        DenseCLIPFeatures.from_open_clip(torch.nn.Linear(2, 2))
