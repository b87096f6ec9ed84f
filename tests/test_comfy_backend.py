"""nodes/comfy/backend.py without ComfyUI: the ComfyUI backend driven through flow.refine_batch with
stand-ins that follow ComfyUI's conventions ([B, H, W, C] pixels, unscaled latents, tokenize dicts,
CONDITIONING lists) around the tiny diffusers models, against the diffusers backend on the same weights."""

import numpy as np
import pytest
import torch

from g4seg_core.method import flow
from g4seg_core.config import G4SegConfig
from g4seg_core.models.text_encoders import PromptEmbedding
from g4seg_core.pipeline import G4SegPipeline
from nodes.comfy import attention_patch, backend as comfy_backend
from nodes import refine_node


class StandInVAE:
    """ComfyUI's VAE API: pixels [B, H, W, C] in [0, 1], latents without the scaling factor."""

    def __init__(self, pipe):
        self.pipe, self.scale = pipe, pipe.components.vae_scaling_factor

    def encode(self, pixels):
        assert pixels.dim() == 4 and pixels.shape[-1] == 3
        return self.pipe.encode(pixels.permute(0, 3, 1, 2)) / self.scale

    def decode(self, latents):
        return self.pipe.decode(latents * self.scale).permute(0, 2, 3, 1)


class StandInCLIP:
    """ComfyUI's CLIP API: tokenize -> {"h": [[(id, weight), ...]]}, encode_from_tokens_scheduled -> CONDITIONING."""

    def __init__(self, pipe):
        self.pipe, self.texts = pipe, {}

    def tokenize(self, text):
        tokens = {"h": [[(int(i), 1.0) for i in self.pipe.components.tokenizer(text).tolist()]]}
        self.texts[id(tokens)] = text
        return tokens

    def encode_from_tokens_scheduled(self, tokens):
        embedding = self.pipe.prompt_embedding(self.texts[id(tokens)])
        return [[embedding.hidden_states, {"pooled_output": None}]]  # cond [1, 77, C], as ComfyUI's


@pytest.fixture(scope="module")
def pipe():
    return G4SegPipeline.tiny()


@pytest.fixture()
def stand_ins(monkeypatch, pipe):
    """Sampling and model patching go to the diffusers backend; everything else is comfy_backend's own code."""
    scale = pipe.components.vae_scaling_factor
    calls = []

    def sample_one_step(model, positive, negative, samples, noise, timestep, cfg, seed, noise_mask=None):
        _, injection = model if isinstance(model, tuple) else (model, None)
        calls.append(samples.shape[0])
        config = G4SegConfig(timestep=timestep, cfg_scale=cfg, seed=seed)
        rows = samples.shape[0]
        cond = positive[0][0]
        assert len(positive) == 1 and cond.shape[0] in (1, rows)  # ComfyUI: one cond row per latent, or shared
        rows_cond = [cond[i % cond.shape[0]][None] for i in range(rows)]
        embeddings = [PromptEmbedding(c, None, []) for c in rows_cond]
        x0 = pipe.denoise(samples * scale, noise, embeddings, injection, config,
                          None if negative is None else PromptEmbedding(negative[0][0], None, []))
        return x0 / scale

    monkeypatch.setattr(attention_patch, "model_family", lambda model: "sd21")
    monkeypatch.setattr(attention_patch, "inject", lambda model, injection: ((model, injection), "sd21", 0))
    monkeypatch.setattr(comfy_backend, "sample_one_step", sample_one_step)
    return pipe, StandInCLIP(pipe), StandInVAE(pipe), calls


def _inputs(h=60, w=80, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.float32)
    mask[15:45, 20:60] = 1
    return image, mask


@pytest.mark.parametrize("config", [G4SegConfig(size=64, correspondence_grid=0),
                                    G4SegConfig(size=64, correspondence_grid=0, cfg_scale=3.0, seed=5)])
def test_comfy_backend_equals_the_diffusers_backend(stand_ins, config):
    pipe, clip, vae, calls = stand_ins
    (image_a, mask_a), (image_b, mask_b) = _inputs(seed=1), _inputs(seed=2)
    mask_b = mask_b[::2, ::2].copy()  # another resolution, same framing
    comfy = comfy_backend.ComfyBackend("model", clip, vae, extractor=pipe.clip)
    got = flow.refine_batch(comfy, [image_a, image_b], [mask_a, mask_b], "cat", config)
    want = pipe.refine_batch([image_a, image_b], [mask_a, mask_b], "cat", config)
    assert calls == [2]  # one prompt for the batch: one sampling call
    for g, w in zip(got, want):
        assert g.prob.shape == w.prob.shape
        np.testing.assert_allclose(g.prob, w.prob, atol=1e-4)
        np.testing.assert_allclose(g.generated_pixels, w.generated_pixels, atol=1e-4)


def test_refine_node_one_image_several_masks(stand_ins):
    """The node's IMAGE/MASK batches: one image, two masks; mask i gets seed + i; the image is encoded once."""
    pipe, clip, vae, calls = stand_ins
    image, mask = _inputs()
    other = np.zeros_like(mask)
    other[5:30, 10:70] = 1
    encodes = []
    original_encode = vae.encode
    vae.encode = lambda pixels: encodes.append(pixels.shape[0]) or original_encode(pixels)
    config = G4SegConfig(size=64, correspondence_grid=0)
    refined, binary, generated = refine_node.refine(
        "model", clip, vae, None, torch.from_numpy(image)[None].float() / 255,
        torch.from_numpy(np.stack([mask, other])), "cat", config, extractor=pipe.clip)
    assert encodes == [1] and refined.shape == (2, 60, 80) and generated.shape == (2, 64, 64, 3)
    single = pipe.refine(image, other, "cat", config.replace(seed=1))
    np.testing.assert_allclose(refined[1].numpy(), single.prob, atol=1e-4)
    assert torch.equal(binary, (refined >= 0.5).float())


def test_different_prompts_share_one_sampling_call(stand_ins):
    """Rows with different class names are the rows of one batched CONDITIONING: one sampling call."""
    pipe, clip, vae, calls = stand_ins
    (image_a, mask_a), (image_b, mask_b) = _inputs(seed=1), _inputs(seed=2)
    comfy = comfy_backend.ComfyBackend("model", clip, vae, extractor=pipe.clip)
    config = G4SegConfig(size=64, correspondence_grid=0)
    got = flow.refine_batch(comfy, [image_a, image_b], [mask_a, mask_b], ["cat", "dog"], config)
    want = pipe.refine_batch([image_a, image_b], [mask_a, mask_b], ["cat", "dog"], config)
    assert calls == [2]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.prob, w.prob, atol=1e-4)


def test_prompts_reach_comfyui_with_parentheses_escaped(stand_ins):
    """ComfyUI's tokenizer reads "(...)" as prompt weighting; the core reads it literally. Every text the
    backend hands to clip.tokenize escapes them (`\\(` is ComfyUI's literal parenthesis; the real
    tokenizer's handling is checked in tests/integration, case class_name_with_parentheses)."""
    pipe, clip, vae, _ = stand_ins
    comfy = comfy_backend.ComfyBackend("model", clip, vae, extractor=pipe.clip)
    comfy.prompt("a photo of a tv (monitor)", "tv (monitor)")
    comfy.prompt("blurry (low quality)", None)
    tokenized = set(clip.texts.values())
    assert {"a photo of a tv \\(monitor\\)", "tv \\(monitor\\)", "blurry \\(low quality\\)"} <= tokenized
    assert not any("(" in t.replace("\\(", "") for t in tokenized)


def test_refine_classes_gives_one_label_map_in_cli_eval_and_node(stand_ins, tmp_path, monkeypatch):
    """multiclass.refine_classes through `g4seg segment --refine`, eval's g4seg refiner and G4SegRefineClasses:
    the same image, class maps and config give the same label map (the one rule picks cat and dog, not cow)."""
    import dataclasses
    import types

    from PIL import Image

    from g4seg_core.commands.main import main
    from g4seg_core.evaluation import runner
    from g4seg_core.evaluation.baselines import make_refiner
    from g4seg_core.files.mask_files import load_label_map
    from g4seg_core.zeroshot import ZeroShotSegmenter
    from nodes import text_to_mask_node

    pipe, clip, vae, calls = stand_ins
    image, cat = _inputs(48, 64, seed=3)
    dog = np.zeros_like(cat)
    dog[25:46, 30:62] = 0.9
    cow = np.full_like(cat, 0.3)  # never reaches the threshold: passes through, still fused
    names, maps = ["cat", "dog", "cow"], np.stack([cat, dog, cow])
    config = G4SegConfig(size=64, correspondence_grid=0, dtype="float32")

    # the command line: the segmenter's per-class maps replaced by ours, the rest is the command's own code
    real_segment = ZeroShotSegmenter.segment
    monkeypatch.setattr(ZeroShotSegmenter, "segment",
                        lambda self, *a, **k: dataclasses.replace(real_segment(self, *a, **k), probs=maps.copy()))
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert main(["segment", str(tmp_path / "photo.png"), "--classes", ", ".join(names), "--out", str(tmp_path / "out"),
                 "--refine", "--selfcheck", "--size", "64", "--grid", "0", "--dtype", "float32", "--templates",
                 "single", "--short-side", "64", "--window", "64", "--stride", "32", "--background", "none"]) == 0
    cli = load_label_map(tmp_path / "out" / "refined" / "photo.png")

    # eval: the runner's per-image step with the g4seg refiner
    sample = types.SimpleNamespace(id="photo", image=image, gt=np.zeros(cat.shape, np.int64), image_path="",
                                   gt_path="", coarse={1: cat, 2: dog, 3: cow}, labels={1: "cat", 2: "dog", 3: "cow"})
    refiners = {"g4seg": make_refiner("g4seg", pipeline=pipe, config=config)}
    before = runner.score(np.zeros(cat.shape, np.uint8), sample.gt, 4, 255)
    (_, _, evaluated), = runner.evaluate_image(sample, refiners, 4, 255, config.bg_power, 0.02, before)

    # the node, on ComfyUI-convention stand-ins around the same tiny models
    refined, labels = text_to_mask_node.refine_classes(
        "model", clip, vae, None, torch.from_numpy(image)[None].float() / 255, torch.from_numpy(maps),
        ", ".join(names), config, extractor=pipe.clip)

    core = pipe.refine_classes(image, dict(zip(names, maps)), config)
    assert list(core.results) == ["cat", "dog"] and {1, 2} <= set(np.unique(core.labels).tolist())
    assert calls == [2]  # the node: cat and dog refined in one sampling call, cow not
    np.testing.assert_array_equal(cli, core.labels)
    np.testing.assert_array_equal(evaluated, core.labels)
    np.testing.assert_array_equal(labels[0].numpy(), core.labels)
    np.testing.assert_allclose(refined.numpy(), np.stack(list(core.probs.values())), atol=1e-4)


def test_batched_conditioning_stacks_rows_and_keeps_apart_what_cannot_stack():
    cat = [[torch.ones(1, 77, 8), {"pooled_output": torch.ones(1, 4)}]]
    dog = [[torch.full((1, 77, 8), 2.0), {"pooled_output": torch.full((1, 4), 2.0)}]]
    long_prompt = [[torch.zeros(1, 154, 8), {"pooled_output": torch.zeros(1, 4)}]]
    groups = comfy_backend.batched_conditioning([cat, dog, cat])
    (rows, conditioning), = groups
    assert rows == [0, 1, 2] and len(conditioning) == 1
    cond, extra = conditioning[0]
    assert cond[:, 0, 0].tolist() == [1.0, 2.0, 1.0] and extra["pooled_output"][:, 0].tolist() == [1.0, 2.0, 1.0]
    assert comfy_backend.batched_conditioning([cat, cat]) == [([0, 1], cat)]  # one object: used as it is
    groups = comfy_backend.batched_conditioning([cat, long_prompt, dog])
    assert [rows for rows, _ in groups] == [[0, 2], [1]] and groups[1][1] is long_prompt
