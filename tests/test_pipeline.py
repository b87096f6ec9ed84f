"""End-to-end pipeline on tiny random-weight models (every family, eps and v), and bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.pipeline import G4SegPipeline

CONFIG = G4SegConfig(size=64, correspondence_grid=0)


@pytest.fixture(scope="module")
def pipe():
    return G4SegPipeline.tiny()


def _inputs(h=72, w=56, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.float32)
    mask[15:55, 10:40] = 1
    return image, mask


def test_refine_end_to_end(pipe):
    image, mask = _inputs()
    result = pipe.refine(image, mask, "cat", CONFIG)
    assert result.prob.shape == mask.shape and result.prob.dtype == np.float32
    assert np.isfinite(result.prob).all() and result.prob.min() >= 0 and result.prob.max() <= 1
    assert result.binary.dtype == np.bool_ and result.binary.shape == mask.shape
    assert result.generated.size == (64, 64)
    assert "sdf" in result.softening
    # coarse filtering: pixels outside the band are never touched
    outside = (result.coarse < 0.2) | (result.coarse > 0.6)
    assert np.array_equal(result.prob[outside], result.coarse[outside])
    assert np.count_nonzero(result.prob != result.coarse) > 0
    for stage in ("vae_encode", "clip_original", "unet", "vae_decode", "clip_generated",
                  "correspondence_and_mixing", "total"):
        assert result.timings[stage] >= 0
    assert result.prompt == "a photo of a cat" and len(result.token_positions) >= 1
    again = pipe.refine(image, mask, "cat", CONFIG)
    assert np.array_equal(again.prob, result.prob)  # deterministic under the seed


def test_injection_changes_the_generation(pipe):
    image, mask = _inputs()
    on = pipe.refine(image, mask, "cat", CONFIG.replace(emi_mode="additive", cross_weight=20.0, self_weight=20.0))
    off = pipe.refine(image, mask, "cat", CONFIG.replace(emi_mode="off"))
    assert not np.array_equal(np.asarray(on.generated), np.asarray(off.generated))


def test_cfg_runs_and_pil_input(pipe):
    image, mask = _inputs()
    result = pipe.refine(Image.fromarray(image), mask, "cat", CONFIG.replace(cfg_scale=3.0))
    assert result.prob.shape == mask.shape


@pytest.mark.parametrize("family, prediction", [("sd15", "epsilon"), ("sd21v", "v_prediction"), ("sdxl", "epsilon")])
def test_other_families(family, prediction):
    image, mask = _inputs(48, 48)
    result = G4SegPipeline.tiny(family=family, prediction_type=prediction).refine(image, mask, "dog", CONFIG)
    assert result.prob.shape == (48, 48) and np.isfinite(result.prob).all()
    assert result.config is not None


def test_multiclass(pipe):
    image, mask = _inputs()
    other = np.zeros_like(mask)
    other[50:70, 30:56] = 0.8
    faint = np.full_like(mask, 0.3)  # never reaches the threshold: not refined, still fused
    out = pipe.refine_classes(image, {"cat": mask, "dog": other, "cow": faint}, CONFIG,
                              class_indices={"cat": 8, "dog": 12, "cow": 10})
    assert out.labels.shape == mask.shape
    assert set(np.unique(out.labels)) <= {0, 8, 10, 12}
    assert (out.labels == 8).any() and (out.labels == 12).any()
    assert list(out.results) == ["cat", "dog"] and list(out.probs) == ["cat", "dog", "cow"]
    assert np.array_equal(out.probs["cow"], faint) and out.probs["cat"] is out.results["cat"].prob


def test_soft_input_is_not_softened(pipe):
    image, _ = _inputs()
    soft = np.zeros((72, 56), np.float32)
    soft[10:60, 10:45] = 0.45
    soft[20:50, 15:40] = 0.9
    result = pipe.refine(image, soft, "cat", CONFIG)
    assert np.array_equal(result.coarse, soft)
    assert "not softened" in result.softening


@pytest.mark.parametrize("make, fragment", [
    (lambda im, m: (im, m[:48]), "aspect ratios differ"),
    (lambda im, m: (im, np.zeros_like(m)), "empty"),
    (lambda im, m: (im, np.ones_like(m)), "whole image"),
    (lambda im, m: (im, np.where(m > 0, np.nan, 0).astype(np.float32)), "NaN"),
    (lambda im, m: (im, m * 3), "0, 1"),
    (lambda im, m: (im[..., 0], m), "RGB"),
    (lambda im, m: (Image.fromarray(im).convert("L"), m), "RGB"),
    (lambda im, m: (np.concatenate([im, im[..., :1]], -1), m), "RGB"),
])
def test_bad_inputs_give_clear_errors(pipe, make, fragment):
    image, mask = make(*_inputs())
    with pytest.raises(G4SegError, match=fragment):
        pipe.refine(image, mask, "cat", CONFIG)


def test_label_not_in_prompt(pipe):
    image, mask = _inputs()
    with pytest.raises(G4SegError, match="not found"):
        # "cats" tokenizes differently from "cat": the class tokens are not in the prompt
        pipe.refine(image, mask, "cat", CONFIG.replace(prompt_template="a photo of {}s"))
    with pytest.raises(G4SegError, match="empty"):
        pipe.refine(image, mask, "  ", CONFIG)
    with pytest.raises(G4SegError):
        pipe.refine(image, mask, "cat " * 100, CONFIG)  # longer than 77 tokens


def test_mask_at_another_resolution_with_the_image_aspect_ratio(pipe):
    """Any mask resolution with the image's framing works; the result has the mask's size."""
    image, mask = _inputs()
    half = mask[::2, ::2]
    result = pipe.refine(image, half, "cat", CONFIG)
    assert result.prob.shape == half.shape


def test_size_zero_keeps_the_image_size(pipe):
    image, mask = _inputs(h=96, w=80)
    result = pipe.refine(image, mask, "cat", CONFIG.replace(size=0))
    assert result.generated.size == (80, 96) and result.prob.shape == mask.shape
    with pytest.raises(G4SegError, match="separate batches"):
        pipe.refine_batch([image, image[:88]], [mask, mask[:88]], "cat", CONFIG.replace(size=0))


def test_float_image_and_torch_mask(pipe):
    image, mask = _inputs()
    result = pipe.refine(image.astype(np.float32) / 255.0, torch.from_numpy(mask), "cat", CONFIG)
    assert result.prob.shape == mask.shape


@pytest.mark.parametrize("family, config", [
    ("sd21", CONFIG),
    ("sd21", CONFIG.replace(cfg_scale=3.0, emi_mode="additive", cross_weight=20.0, self_weight=20.0)),
    ("sdxl", CONFIG),
])
def test_batch_equals_one_by_one(family, config):
    """Each image keeps its own mask, class tokens and noise inside a batch."""
    pipe = G4SegPipeline.tiny(family=family)
    (img_a, mask_a), (img_b, mask_b) = _inputs(seed=1), _inputs(seed=2)
    mask_b = np.zeros_like(mask_b)
    mask_b[30:70, 20:50] = 1  # a different region: per-image masks must not mix
    batch = pipe.refine_batch([img_a, img_b], [mask_a, mask_b], ["cat", "potted plant"], config)
    # the documented batch seed rule: image i gets the noise of seed + i
    singles = [pipe.refine(img_a, mask_a, "cat", config),
               pipe.refine(img_b, mask_b, "potted plant", config.replace(seed=config.seed + 1))]
    assert [r.label for r in batch] == ["cat", "potted plant"]
    assert batch[0].token_positions != batch[1].token_positions or batch[0].prompt != batch[1].prompt
    for got, want in zip(batch, singles):
        np.testing.assert_allclose(got.prob, want.prob, atol=2e-3)
        gen_diff = np.abs(np.asarray(got.generated, np.int16) - np.asarray(want.generated, np.int16))
        assert gen_diff.max() <= 2  # uint8 pictures; batched kernels round differently
        assert got.timings["batch_size"] == 2
    # the two images really differ (a batch that repeated image 0 would fail above)
    assert not np.array_equal(np.asarray(batch[0].generated), np.asarray(batch[1].generated))


def test_batch_input_errors(pipe):
    image, mask = _inputs()
    with pytest.raises(G4SegError, match="as many images, masks and labels"):
        pipe.refine_batch([image, image], [mask], "cat", CONFIG)
    with pytest.raises(G4SegError, match="at least one"):
        pipe.refine_batch([], [], [], CONFIG)
    with pytest.raises(G4SegError, match="as many"):
        pipe.refine_batch([image], [mask], ["cat", "dog"], CONFIG)
    with pytest.raises(G4SegError, match="empty"):  # each mask is still validated
        pipe.refine_batch([image, image], [mask, np.zeros_like(mask)], "cat", CONFIG)
