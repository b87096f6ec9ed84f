"""g4seg bench's measuring tools and --compile's plumbing on tiny models (no timing is asserted)."""

import json

import numpy as np
import pytest
import torch

from g4seg_core.commands import bench
from g4seg_core.commands.main import main
from g4seg_core.config import G4SegConfig
from g4seg_core.pipeline import G4SegPipeline


def test_example_batch_is_distinct_images_masks_and_names():
    images, masks, labels = bench.example_batch(64, 9)
    assert len(images) == len(masks) == len(labels) == 9
    assert len({im.tobytes() for im in images}) == 9  # distinct: each is VAE-encoded, not deduplicated
    assert len({m.tobytes() for m in masks[:7]}) == 7
    assert len(set(labels)) == 8 and labels[0] == "cat"
    assert {im.shape for im in images} == {images[0].shape} and {m.shape for m in masks} == {masks[0].shape}
    assert all(im.dtype == np.uint8 for im in images)


def test_counted_flops_and_operators():
    a, b = torch.rand(8, 16), torch.rand(16, 4)
    flops, ops = bench.counted(lambda: (a @ b).relu().sum())
    assert flops == 2 * 8 * 16 * 4 and ops == 3
    q = torch.rand(1, 2, 32, 8)  # the CPU's fused attention kernel is counted as well
    flops, _ = bench.counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 1 * 2 * 32 * 32 * 8)


def test_bench_measures_distinct_batch_counts_and_compiled_plumbing(monkeypatch, tmp_path, capsys):
    from g4seg_core.models.tiny import tiny_clip_features, tiny_sd_components

    monkeypatch.setattr(bench, "bench_models", lambda: (tiny_sd_components("sd21"), tiny_clip_features()))
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--dtype", "float32", "--size", "64", "--repeats", "1", "--batch", "3",
                 "--compile", "--compile-backend", "eager", "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["batch"] == 3 and set(numbers["bare_batched_s"]) == {"vae_encode", "unet", "vae_decode", "clip_x2"}
    assert numbers["ratio_batched_end_to_end_over_bare"] > 0
    flops = numbers["flops_per_image"]
    assert all(flops[k] > 0 for k in ("vae_encode", "unet", "vae_decode", "clip", "end_to_end"))
    assert flops["end_to_end"] > flops["unet"] + flops["vae_decode"]
    ops = numbers["operators"]
    assert ops["batch"] == 3 and ops["batch_3"] > 0 and ops["ratio_batch_over_batch_1"] == ops["batch_3"] / ops["batch_1"]
    compiled = numbers["compiled"]
    assert compiled["parts"] == ["vae_encoder", "vae_decoder", "clip"] and compiled["backend"] == "eager"
    assert compiled["generated_image_rel_err_vs_eager"] < 1e-4
    text = capsys.readouterr().out
    assert "torch operators per refine: batch 1" in text and "end to end / bare passes: batch 1" in text


def test_compiled_pipeline_gives_the_eager_result():
    """dynamo traces the compiled parts (backend eager: no CUDA here) and the refine is unchanged."""
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    config = G4SegConfig(size=64)
    pipe = G4SegPipeline.tiny()
    pixels = pipe.to_pixels(image, 64)
    want = pipe.refine(image, mask, "cat", config), pipe.encode(pixels), pipe.features(pixels)
    assert pipe.compile(backend="eager") == ["vae_encoder", "vae_decoder", "clip"]
    got = pipe.refine(image, mask, "cat", config), pipe.encode(pixels), pipe.features(pixels)
    assert np.abs(got[0].generated_pixels - want[0].generated_pixels).max() < 1e-5
    assert torch.allclose(got[1], want[1], atol=1e-5) and torch.allclose(got[2], want[2], atol=1e-5)


def test_compile_is_refused_on_the_cpu_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "bench_models", lambda: pytest.fail("models built before the --compile check"))
    assert main(["bench", "--device", "cpu", "--dtype", "float32", "--compile"]) == 2
    assert "--compile needs a CUDA device" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    coarse = np.zeros((32, 32), np.uint8)
    coarse[8:24, 8:24] = 255
    Image.fromarray(coarse).save(tmp_path / "m.png")
    assert main(["refine", str(tmp_path / "a.png"), str(tmp_path / "m.png"), "--label", "cat", "--out",
                 str(tmp_path / "o"), "--selfcheck", "--compile"]) == 2
    err = capsys.readouterr().err
    assert "--compile needs a CUDA device" in err and "Drop --compile" in err
    with pytest.raises(Exception, match="--compile needs a CUDA device"):
        G4SegPipeline.tiny().compile()


def test_unet_operators_counts_what_the_injection_adds(capsys):
    """bench/unet_operators.py on the tiny UNet (meta device): the injected call dispatches more than the bare one,
    densediffusion more than additive."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "unet_operators.py"
    spec = importlib.util.spec_from_file_location("unet_operators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--family", "tiny", "--size", "64", "--batch", "1"]) == 0
    from g4seg_core.models.components import build_unet
    from g4seg_core.models.tiny import tiny_configs

    with torch.device("meta"):
        unet = torch.nn.Module.to(build_unet(tiny_configs("sd21")["unet"]), torch.float16)
    dense, additive = (module.count_call(unet, 2, 64, mode) for mode in ("densediffusion", "additive"))
    assert dense["injected"] > additive["injected"] > additive["bare"] == dense["bare"] > 0
    assert "batch 1, densediffusion" in capsys.readouterr().out
