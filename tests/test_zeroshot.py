"""Words -> coarse mask: each formula against a direct recomputation on tiny random models."""

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g4seg_core.errors import G4SegError
from g4seg_core.method.resampling import linear_resampling_matrix
from g4seg_core.zeroshot import neighbourhood as nb
from g4seg_core.zeroshot import segment as sg
from g4seg_core.zeroshot import text as tx
from g4seg_core.zeroshot.vocabulary import IMAGENET_TEMPLATES, STUFF_WORDS, parse_classes

WIDTH, OUT = 128, 16  # 64-wide heads, as every released CLIP text tower (heads are not in the weights)


def tiny_visual(seed=0, image_size=64, patch=16):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=image_size, patch_size=patch, width=WIDTH, layers=3, heads=2, mlp_ratio=2.0,
                             output_dim=OUT).eval()


def tiny_text(seed=1):
    from open_clip.transformer import TextTransformer

    torch.manual_seed(seed)
    t = TextTransformer(width=WIDTH, heads=2, layers=2, mlp_ratio=2.0, output_dim=OUT).eval()
    with torch.no_grad():
        t.positional_embedding.normal_(0, 0.1)
    return t


def to_transformers(visual):
    """The same weights as a transformers CLIPVisionModelWithProjection (test-only key mapping)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    layers = len(visual.transformer.resblocks)
    width, out = visual.proj.shape
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=visual.transformer.resblocks[0].attn.num_heads,
                           image_size=visual.image_size[0], patch_size=visual.patch_size[0],
                           projection_dim=out, hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModelWithProjection(cfg).eval()
    sd = {"embeddings.patch_embedding.weight": visual.conv1.weight, "embeddings.class_embedding": visual.class_embedding,
          "embeddings.position_embedding.weight": visual.positional_embedding,
          "pre_layrnorm.weight": visual.ln_pre.weight, "pre_layrnorm.bias": visual.ln_pre.bias,
          "post_layernorm.weight": visual.ln_post.weight, "post_layernorm.bias": visual.ln_post.bias}
    for i, blk in enumerate(visual.transformer.resblocks):
        p = f"encoder.layers.{i}."
        q, k, v = blk.attn.in_proj_weight.chunk(3)
        qb, kb, vb = blk.attn.in_proj_bias.chunk(3)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                   p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
                   p + "self_attn.out_proj.weight": blk.attn.out_proj.weight,
                   p + "self_attn.out_proj.bias": blk.attn.out_proj.bias,
                   p + "layer_norm1.weight": blk.ln_1.weight, p + "layer_norm1.bias": blk.ln_1.bias,
                   p + "layer_norm2.weight": blk.ln_2.weight, p + "layer_norm2.bias": blk.ln_2.bias,
                   p + "mlp.fc1.weight": blk.mlp.c_fc.weight, p + "mlp.fc1.bias": blk.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": blk.mlp.c_proj.weight, p + "mlp.fc2.bias": blk.mlp.c_proj.bias})
    target = model.vision_model.state_dict()
    sd = {k: v.detach().clone() for k, v in sd.items()}
    assert set(sd) == {k for k in target if not k.endswith("position_ids")}
    model.vision_model.load_state_dict(sd, strict=False)
    model.visual_projection.weight.data.copy_(visual.proj.detach().t())
    return model


# ---------------------------------------------------------------------------- vocabulary
def test_templates_are_openai_imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    assert len(IMAGENET_TEMPLATES) == 80
    assert [t.replace("{}", "zebra") for t in IMAGENET_TEMPLATES] == [f("zebra") for f in OPENAI_IMAGENET_TEMPLATES]


def test_parse_classes_synonyms_background_and_errors():
    c = parse_classes("cat, Sofa | couch\nperson, sky", background="voc")
    assert c.classes == ("cat", "sofa", "person", "sky")
    assert c.synonyms[1] == ("sofa", "couch")
    assert "sky" not in c.background and c.dropped_background == ("sky",)
    assert len(c.background) == len(STUFF_WORDS) - 1
    assert ("couch", 2) in c.queries and ("wall", 0) in c.queries
    assert parse_classes("cat", background="none").background == ()
    assert parse_classes("cat", background="grass, dirt").background == ("grass", "dirt")
    for bad, words in [("", "empty"), (" , ,", "empty"), ("cat, Cat", "twice"), ("sofa|couch, couch", "twice"),
                       ("sofa|", "empty synonym")]:
        with pytest.raises(G4SegError, match=words):
            parse_classes(bad)


# ---------------------------------------------------------------------------- neighbourhood term
def test_neighbourhood_bias_is_the_gaussian_of_patch_distances():
    grid, sigma = (3, 4), 1.7
    omega = nb.neighbourhood_bias(grid, sigma)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    for i in range(12):
        for j in range(12):
            (yi, xi), (yj, xj) = divmod(i, 4), divmod(j, 4)
            want = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * sigma ** 2))
            assert abs(float(omega[1 + i, 1 + j]) - want) < 1e-6
    assert torch.equal(nb.neighbourhood_bias(grid, sigma, with_cls=False), omega[1:, 1:])
    with pytest.raises(G4SegError):
        nb.neighbourhood_bias(grid, 0)


def test_keys_against_keys_attention_without_residual_or_mlp():
    torch.manual_seed(0)
    heads, grid, n = 2, (2, 3), 7
    norm = torch.nn.LayerNorm(WIDTH)
    key, value, out = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(3))
    block = nb.LastBlock(norm=norm, key=key, value=value, out=out, heads=heads)
    x = torch.randn(2, n, WIDTH)
    got = nb.neighbourhood_attention(x, block, grid, sigma=5.0)
    omega = nb.neighbourhood_bias(grid, 5.0)
    d = WIDTH // heads
    want = torch.zeros(2, n, WIDTH)
    for b in range(2):
        h = norm(x[b])
        k, v = key(h), value(h)
        mixed = []
        for head in range(heads):
            kh, vh = k[:, head * d:(head + 1) * d], v[:, head * d:(head + 1) * d]
            weights = torch.softmax(kh @ kh.T / math.sqrt(d) + omega, dim=-1)
            mixed.append(weights @ vh)
        want[b] = out(torch.cat(mixed, dim=-1))  # no "+ x", no MLP
    assert torch.allclose(got, want, atol=1e-5)


def _direct_naclip(visual, images, sigma=5.0):
    """The recipe written out: blocks 0..L-2 as they are, the last block replaced, ln_post, proj, CLS dropped."""
    from g4seg_core.models.clip_features import CLIP_MEAN, CLIP_STD, interpolate_position_grid

    pixels = (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    p = visual.conv1.kernel_size[0]
    grid = (images.shape[2] // p, images.shape[3] // p)
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    x = x + interpolate_position_grid(pos[1:], tuple(visual.grid_size), grid)
    x = torch.cat([(visual.class_embedding + pos[0]).expand(x.shape[0], 1, -1), x], dim=1)
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    for blk in blocks[:-1]:
        x = blk(x)
    last = blocks[-1]
    h = last.ln_1(x)
    w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
    k = h @ w[WIDTH:2 * WIDTH].T + b[WIDTH:2 * WIDTH]
    v = h @ w[2 * WIDTH:].T + b[2 * WIDTH:]
    heads, d = last.attn.num_heads, WIDTH // last.attn.num_heads
    omega = nb.neighbourhood_bias(grid, sigma)
    outs = []
    for i in range(heads):
        kh, vh = k[..., i * d:(i + 1) * d], v[..., i * d:(i + 1) * d]
        outs.append(torch.softmax(kh @ kh.transpose(1, 2) / math.sqrt(d) + omega, dim=-1) @ vh)
    x = last.attn.out_proj(torch.cat(outs, dim=-1))
    x = visual.ln_post(x)[:, 1:] @ visual.proj
    return F.normalize(x.transpose(1, 2).reshape(x.shape[0], -1, *grid), dim=1)


@torch.no_grad()
def test_open_clip_naclip_features_equal_direct_recomputation():
    visual = tiny_visual()
    images = torch.rand(2, 3, 96, 80)  # not the native 64x64: positions are interpolated
    feats = nb.from_open_clip(visual)(images)
    assert feats.shape == (2, OUT, 6, 5)
    assert torch.allclose(feats, _direct_naclip(visual, images), atol=1e-5)
    # no MLP and no query weights in the last block: changing them changes nothing
    last = visual.transformer.resblocks[-1]
    last.mlp.c_fc.weight.data.normal_()
    last.attn.in_proj_weight.data[:WIDTH].normal_()
    assert torch.allclose(nb.from_open_clip(visual)(images), feats, atol=1e-6)
    # ...while an earlier block's MLP does matter
    visual.transformer.resblocks[0].mlp.c_fc.weight.data.normal_()
    assert not torch.allclose(nb.from_open_clip(visual)(images), feats, atol=1e-3)


@torch.no_grad()
def test_transformers_format_equals_open_clip_format_on_the_same_weights():
    visual = tiny_visual(seed=3)
    images = torch.rand(1, 3, 64, 112)
    a = nb.from_open_clip(visual, sigma=2.0)(images)
    b = nb.from_transformers(to_transformers(visual), sigma=2.0)(images)
    assert a.shape == b.shape == (1, OUT, 4, 7)
    assert torch.allclose(a, b, atol=1e-5)
    # and neighbourhood_features() picks the right builder for an existing DenseCLIPFeatures
    from g4seg_core.models.clip_features import DenseCLIPFeatures

    c = nb.neighbourhood_features(DenseCLIPFeatures.from_transformers(to_transformers(visual)), sigma=2.0)(images)
    assert torch.allclose(a, c, atol=1e-5)


# ---------------------------------------------------------------------------- text
def fake_tower(dim=OUT):
    """A deterministic 'text encoder': a random vector per prompt string."""
    def tower(prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))  # stable across processes
            out.append(torch.randn(dim, generator=g) * (1 + len(p) % 3))
        return torch.stack(out)
    tower.name = "fake text"
    return tower


def test_template_averaging_normalises_each_prompt_then_the_mean():
    tower = fake_tower()
    templates = ("a photo of a {}.", "a {} in a video game.", "art of the {}.")
    got = tx.class_embedding(tower, ["cat", "sofa"], templates)
    for row, name in zip(got, ["cat", "sofa"]):
        each = [F.normalize(tower([t.format(name)])[0], dim=0) for t in templates]
        want = F.normalize(torch.stack(each).mean(0), dim=0)
        assert torch.allclose(row, want, atol=1e-6)
    cached = tx.QueryEmbeddings(tower)
    assert torch.allclose(cached(["sofa", "cat"], templates), got.flip(0), atol=1e-6)
    assert len(cached.cache) == 2


@torch.no_grad()
def test_open_clip_text_tower_trimmed_padding_equals_full_context():
    from g4seg_core.models.tokenizer import G4SegTokenizer

    t = tiny_text()
    tower = tx.OpenCLIPTextTower(t)
    prompts = ["a photo of a cat.", "a bad photo of the hard to see sofa in a video game."]
    tok = G4SegTokenizer(pad_token_id=0)
    want = t(torch.stack([tok(p) for p in prompts]))  # open_clip's own forward, padded to 77
    assert torch.allclose(tower(prompts), want, atol=1e-5)


def sd2_like_file(tmp_path, with_projection=True, name="sd2.safetensors"):
    from safetensors.torch import save_file

    t = tiny_text()
    sd = {"cond_stage_model.model." + k: v.contiguous() for k, v in t.state_dict().items() if k != "attn_mask"}
    if not with_projection:
        sd.pop("cond_stage_model.model.text_projection")
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    path = tmp_path / name
    save_file(sd, str(path))
    return path, t


@torch.no_grad()
def test_text_tower_from_sd2_checkpoint_and_clear_errors(tmp_path):
    from safetensors.torch import save_file

    from g4seg_core.models.tokenizer import G4SegTokenizer

    path, t = sd2_like_file(tmp_path)
    tower = tx.load_text_tower(path)
    assert tower.width == OUT
    want = t(G4SegTokenizer(pad_token_id=0)("a photo of a dog.")[None])
    assert torch.allclose(tower(["a photo of a dog."]), want, atol=1e-5)

    no_proj, _ = sd2_like_file(tmp_path, with_projection=False, name="converted.safetensors")
    with pytest.raises(G4SegError, match="no text_projection.*diffusers"):
        tx.load_text_tower(no_proj)
    sd1 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)},
              str(sd1))
    with pytest.raises(G4SegError, match="SD1.x.*clip_vision_h"):
        tx.load_text_tower(sd1)
    with pytest.raises(G4SegError, match="clip_vision_h"):
        tx.check_widths(1024, 768)
    tx.check_widths(16, 16)


# ---------------------------------------------------------------------------- geometry
def test_sliding_windows_cover_the_image_with_the_last_flush():
    wins = sg.sliding_windows(336, 448, 224, 112)
    assert sorted({(t, b) for t, b, _, _ in wins}) == [(0, 224), (112, 336)]
    assert sorted({(l, r) for _, _, l, r in wins}) == [(0, 224), (112, 336), (224, 448)]
    wins = sg.sliding_windows(336, 500, 224, 112)
    assert max(r for *_, r in wins) == 500 and all(r - l == 224 for *_, l, r in wins)
    assert sg.sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]
    cover = np.zeros((336, 500), int)
    for t, b, l, r in wins:
        cover[t:b, l:r] += 1
    assert cover.min() >= 1


@pytest.mark.parametrize("out_size,in_size", [(37, 9), (9, 37), (20, 20), (5, 1)])
def test_linear_resampling_matrix_equals_interpolate(out_size, in_size):
    x = torch.randn(1, 1, in_size, 3)
    want = F.interpolate(x, size=(out_size, 3), mode="bilinear", align_corners=False)[0, 0]
    got = linear_resampling_matrix(in_size, out_size) @ x[0, 0]
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("out_hw,in_hw", [((37, 50), (9, 12)), ((9, 5), (37, 40)), ((20, 20), (20, 20)),
                                           ((5, 3), (1, 1)), ((20, 10000), (336, 168000 // 100))])
def test_upsampling_equals_one_interpolate_then_softmax(out_hw, in_hw):
    """The two one-axis passes give what one bilinear F.interpolate of the whole [Q, H, W] would."""
    logits = torch.randn(3, *in_hw) * 4
    want = F.interpolate(logits[None], size=out_hw, mode="bilinear", align_corners=False)[0].softmax(dim=0)
    got, best = sg._class_probabilities(logits, torch.tensor([0, 1, 2]), 2, out_hw, row_chunk=7)
    assert torch.allclose(got, want, atol=1e-5) and torch.equal(best, got.amax(dim=0))


class PixelFeatures:
    """Fake dense features: each patch's feature is a fixed function of its mean colour (window-independent)."""

    patch = 16
    name = "fake vision"

    def __init__(self):
        torch.manual_seed(5)
        self.mix = torch.randn(3, OUT)
        self.calls = []

    def __call__(self, images):
        self.calls.append(tuple(images.shape))
        pooled = F.avg_pool2d(images, self.patch)
        return F.normalize(torch.einsum("bchw,cd->bdhw", pooled, self.mix), dim=1)


def test_window_logits_are_the_average_of_overlapping_windows():
    feats, tower = PixelFeatures(), fake_tower()
    config = sg.ZeroShotConfig(window=64, stride=32, templates="single", window_batch=3)
    seg = sg.ZeroShotSegmenter(feats, tower, config)
    image = torch.rand(1, 3, 96, 128)
    text, _ = seg.query_embeddings(parse_classes("cat, dog", background="none"))
    got, n = seg._window_logits(image, text, None)
    total, count = torch.zeros(2, 96, 128), torch.zeros(96, 128)
    wins = sg.sliding_windows(96, 128, 64, 32)
    assert n == len(wins) == 6
    for t, b, l, r in wins:
        f = feats(image[:, :, t:b, l:r])[0]
        logits = 40.0 * torch.einsum("dhw,qd->qhw", f, text)
        total[:, t:b, l:r] += F.interpolate(logits[None], size=(b - t, r - l), mode="bilinear",
                                            align_corners=False)[0]
        count[t:b, l:r] += 1
    assert torch.allclose(got, total / count, atol=1e-4)
    assert count.max() == 4 and count.min() == 1


def test_segment_softmax_synonym_max_and_background_threshold():
    feats, tower = PixelFeatures(), fake_tower()
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    classes = parse_classes("cat, sofa|couch", background="sky, wall")
    for threshold in (0.0, 0.45):
        config = sg.ZeroShotConfig(short_side=64, window=64, stride=32, templates="single", prob_threshold=threshold)
        seg = sg.ZeroShotSegmenter(feats, tower, config)
        result = seg.segment(image, classes)
        # recompute: working image, window logits, bilinear to the image, softmax over the 5 queries
        work = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, size=(64, 90),
                             mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        text, labels = seg.query_embeddings(classes)
        logits, _ = seg._window_logits(work, text, None)
        probs = F.interpolate(logits[None], size=(40, 56), mode="bilinear", align_corners=False)[0].softmax(0)
        assert [w for w, _ in classes.queries] == ["cat", "sofa", "couch", "sky", "wall"]
        cat, sofa, bg = probs[0], torch.maximum(probs[1], probs[2]), torch.maximum(probs[3], probs[4])
        assert np.allclose(result.probs[0], cat.numpy(), atol=1e-5)
        assert np.allclose(result.probs[1], sofa.numpy(), atol=1e-5)
        assert np.allclose(result.background, bg.numpy(), atol=1e-5)
        stacked = torch.stack([bg, cat, sofa])
        want = stacked.argmax(0)
        want[stacked.amax(0) < threshold] = 0
        assert np.array_equal(result.labels, want.numpy().astype(np.uint8))
        assert result.probs.shape == (2, 40, 56) and result.labels.dtype == np.uint8
    assert (result.labels == 0).any()  # the 0.45 threshold sent some pixels to background


def test_row_chunks_give_the_same_probabilities():
    logits = torch.randn(4, 7, 9)
    labels = torch.tensor([1, 1, 2, 0])
    a, best_a = sg._class_probabilities(logits, labels, 2, (50, 61), row_chunk=512)
    b, best_b = sg._class_probabilities(logits, labels, 2, (50, 61), row_chunk=7)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(best_a, best_b)


def test_config_and_width_checks():
    for bad in (dict(stride=300), dict(window=0), dict(prob_threshold=1.5), dict(logit_scale=0),
                dict(templates="many"), dict(sigma=0), dict(short_side=-1)):
        with pytest.raises(G4SegError):
            sg.ZeroShotConfig(**bad)
    seg = sg.ZeroShotSegmenter(PixelFeatures(), fake_tower(dim=OUT + 1), sg.ZeroShotConfig(templates="single"))
    with pytest.raises(G4SegError, match="two halves of one CLIP"):
        seg.segment(np.zeros((32, 32, 3), np.uint8), "cat")


@torch.no_grad()
def test_load_segmenter_end_to_end_on_tiny_files(tmp_path):
    from safetensors.torch import save_file

    from g4seg_core.zeroshot import load_segmenter

    text_path, _ = sd2_like_file(tmp_path)
    visual = tiny_visual()
    vision_path = tmp_path / "tiny_clip_vision.safetensors"
    save_file({"visual." + k: v.contiguous() for k, v in visual.state_dict().items()}, str(vision_path))
    config = sg.ZeroShotConfig(templates="single", short_side=96, window=64, stride=32)
    seg = load_segmenter(vision_path, text_path, config)
    image = (np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)
    result = seg.segment(image, "cat, person")
    assert result.probs.shape == (2, 50, 70) and result.labels.shape == (50, 70)
    assert result.summary()["windows"] == len(sg.sliding_windows(96, 134, 64, 32))


# ---------------------------------------------------------------------------- correspondence option
@torch.no_grad()
def test_clip_features_option_uses_the_naclip_block_for_the_correspondence():
    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    pipe = G4SegPipeline.tiny()
    pixels = torch.rand(1, 3, 64, 64)
    plain, naclip = pipe.features(pixels), pipe.features(pixels, "naclip")
    assert torch.allclose(naclip, nb.neighbourhood_features(pipe.clip)(pixels), atol=1e-6)
    assert not torch.allclose(plain, naclip, atol=1e-3)
    assert G4SegConfig().clip_features == "last_layer"  # default unchanged until measured with real weights
    with pytest.raises(G4SegError):
        G4SegConfig(clip_features="middle").validate()
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    a = pipe.refine(image, mask, "cat", G4SegConfig(size=64, correspondence_grid=0))
    b = pipe.refine(image, mask, "cat", G4SegConfig(size=64, correspondence_grid=0, clip_features="naclip"))
    assert a.prob.shape == b.prob.shape and not np.array_equal(a.prob, b.prob)


@torch.no_grad()
def test_text_tower_batches_equal_one_prompt_per_call():
    t = tiny_text()
    prompts = [tpl.format(w) for w in ("cat", "potted plant", "sky") for tpl in ("a photo of a {}.", "art of the {}.")]
    tower = tx.OpenCLIPTextTower(t, batch_size=4)  # chunks of 4 and 2, each padded to its own longest prompt
    one_by_one = torch.cat([tower([p]) for p in prompts])
    assert torch.allclose(tower(prompts), one_by_one, atol=1e-5)


def test_window_batches_equal_one_window_per_call():
    feats, tower = PixelFeatures(), fake_tower()
    image = torch.rand(1, 3, 96, 160)
    text, _ = sg.ZeroShotSegmenter(feats, tower).query_embeddings(parse_classes("cat, dog", background="sky"))
    got = {}
    for batch in (1, 4, 64):
        seg = sg.ZeroShotSegmenter(feats, tower, sg.ZeroShotConfig(window=64, stride=32, window_batch=batch))
        feats.calls.clear()
        got[batch], n = seg._window_logits(image, text, None)
        assert len(feats.calls) == -(-n // batch)  # windows per vision call as asked
    assert torch.allclose(got[1], got[4], atol=1e-5) and torch.allclose(got[1], got[64], atol=1e-5)
