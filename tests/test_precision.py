"""dtype `auto`, explicit choices, and the low-precision paths (pipeline, attention patch) on tiny models."""

import json

import numpy as np
import pytest
import torch

from g4seg_core.loading import precision
from g4seg_core.commands.main import main
from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method.injection import InjectionSettings
from g4seg_core.pipeline import G4SegPipeline
from nodes.comfy import attention_patch as ap


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bfloat16."""
    def set_(fast: bool):
        monkeypatch.setattr(precision, "cpu_bf16_support",
                            lambda: (fast, "CPU has avx512_bf16" if fast else "CPU lacks amx_bf16 and avx512_bf16"))
    return set_


def test_auto_on_cpu_follows_native_bf16(cpu_bf16):
    cpu_bf16(True)
    choice = precision.resolve_dtype("auto", "cpu")
    assert choice.dtype == torch.bfloat16 and "avx512_bf16" in choice.reason
    assert precision.resolve_dtype(None, "cpu").dtype == torch.bfloat16
    cpu_bf16(False)
    assert precision.resolve_dtype("auto", "cpu").dtype == torch.float32


def test_explicit_choice_wins_or_names_the_fix(cpu_bf16):
    cpu_bf16(True)
    assert precision.resolve_dtype("float32", "cpu").dtype == torch.float32
    assert precision.resolve_dtype(torch.bfloat16, "cpu").dtype == torch.bfloat16
    cpu_bf16(False)
    slow = precision.resolve_dtype("bfloat16", "cpu")  # runs, and says it is slower
    assert slow.dtype == torch.bfloat16 and "slower" in slow.reason
    with pytest.raises(G4SegError, match="--dtype bfloat16.*--dtype float32"):
        precision.resolve_dtype("float16", "cpu")
    with pytest.raises(G4SegError, match="choose one of auto"):
        precision.resolve_dtype("half", "cpu")
    with pytest.raises(G4SegError, match="choose one of"):
        precision.resolve_dtype(torch.float64, "cpu")


def test_auto_elsewhere_is_float32():
    assert precision.resolve_dtype("auto", "meta").dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert "avx512_bf16" in precision._cpuinfo(str(info))[1]
    precision.cpu_bf16_support.cache_clear()
    try:
        for vendor, flags, fast, words in (("AuthenticAMD", {"fpu", "avx2"}, False, "lacks"),
                                           ("AuthenticAMD", {"avx512_bf16"}, True, "AMD"),
                                           ("GenuineIntel", {"avx512_bf16"}, False, "no amx_bf16")):
            monkeypatch.setattr(precision, "_cpuinfo", lambda v=vendor, f=flags: (v, f))
            precision.cpu_bf16_support.cache_clear()
            got, why = precision.cpu_bf16_support()
            assert got is fast and words in why
            assert precision.resolve_dtype("auto", "cpu").dtype == (torch.bfloat16 if fast else torch.float32)
    finally:
        precision.cpu_bf16_support.cache_clear()


def test_compute_dtype_for_host_storage(cpu_bf16):
    cpu_bf16(True)
    assert precision.compute_dtype_for_storage(torch.bfloat16, "cpu") == torch.bfloat16
    assert precision.compute_dtype_for_storage(torch.float16, "cpu") == torch.float32  # fp16 on CPU is slow
    assert precision.compute_dtype_for_storage(torch.float16, "cuda") == torch.float16
    cpu_bf16(False)
    assert precision.compute_dtype_for_storage(torch.bfloat16, "cpu") == torch.float32


def test_config_dtype_default_and_validation():
    assert G4SegConfig().dtype == "auto"
    with pytest.raises(G4SegError, match="dtype"):
        G4SegConfig(dtype="fp16")


def _inputs():
    rng = np.random.default_rng(0)
    image = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 12:44] = 1
    return image, mask


def test_bfloat16_pipeline_keeps_precise_parts_float32():
    image, mask = _inputs()
    config = G4SegConfig(size=64, correspondence_grid=0)
    ref = G4SegPipeline.tiny(dtype="float32")
    low = G4SegPipeline.tiny(dtype="bfloat16")
    assert low.dtype == torch.bfloat16 and low.components.unet.dtype == torch.bfloat16
    assert low.clip.dtype == torch.bfloat16
    pixels = low.to_pixels(image, 64)
    assert low.encode(pixels).dtype == torch.float32  # latents between stages
    assert low.features(pixels).dtype == torch.float32  # CLIP features for the correspondence
    r, q = ref.refine(image, mask, "cat", config), low.refine(image, mask, "cat", config)
    assert q.prob.dtype == np.float32 and np.isfinite(q.prob).all()
    gen_r = np.asarray(r.generated, np.float32)
    rel = np.linalg.norm(np.asarray(q.generated, np.float32) - gen_r) / np.linalg.norm(gen_r)
    assert rel < 0.1, rel  # same weights, seed and noise: bf16 rounding only
    assert np.abs(q.prob - r.prob).max() < 0.5


def test_cli_refine_reports_the_dtype_used(tmp_path, capsys):
    from PIL import Image

    image, mask = _inputs()
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["refine", str(tmp_path / "img.png"), str(tmp_path / "mask.png"), "--label", "cat", "--out", str(out),
            "--selfcheck", "--size", "64"]
    assert main(args + ["--dtype", "bfloat16"]) == 0
    report = json.loads((out / "img_g4seg.json").read_text())
    assert report["dtype_used"] == "bfloat16" and report["parameters"]["dtype"] == "bfloat16"
    assert main(args + ["--dtype", "float16", "--device", "cpu"]) == 2
    assert "--dtype bfloat16" in capsys.readouterr().err


def _qkv(dtype, batch=1, nq=16, nk=77, width=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, n, width, generator=g).to(dtype) for n in (nq, nk, nk)]


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("mode", ["densediffusion", "additive"])
def test_attention_patch_low_precision_matches_float32(kind, mode):
    """ComfyUI hands the patch fp16/bf16 q, k, v on GPUs: same dtype back, float32's result within rounding."""
    mask = torch.zeros(16, 16)
    mask[4:12, 3:10] = 1
    settings = InjectionSettings(mask=mask, token_positions=[5], mode=mode, cross_weight=2.0, self_weight=1.0)
    opts = {"n_heads": 2, "dim_head": 8, "original_shape": [1, 4, 8, 8], "activations_shape": [1, 320, 4, 4],
            "cond_or_uncond": [0], "sigmas": torch.tensor([1.16])}
    nk = 16 if kind == "self" else 77
    ref = ap.G4SegAttentionPatch(kind, [settings])(*_qkv(torch.float32, nk=nk), opts)
    for dtype in (torch.bfloat16, torch.float16):
        out = ap.G4SegAttentionPatch(kind, [settings])(*_qkv(dtype, nk=nk), opts)
        assert out.dtype == dtype and out.shape == ref.shape
        rel = float((out.float() - ref).norm() / ref.norm())
        assert rel < (0.03 if dtype == torch.bfloat16 else 0.005), (dtype, rel)


def test_bench_compares_with_float32_in_the_same_run(monkeypatch, tmp_path, capsys):
    """The bench's plumbing on tiny models (the real run uses the full-size architecture): no timings asserted."""
    from g4seg_core.commands import bench
    from g4seg_core.models.tiny import tiny_clip_features, tiny_sd_components

    monkeypatch.setattr(bench, "bench_models", lambda: (tiny_sd_components("sd21"), tiny_clip_features()))
    # the 128-grid matching timing has its own bench line; here it would only cost seconds
    monkeypatch.setattr("g4seg_core.method.correspondence.match_upsampled_features", lambda *args: None)
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--dtype", "bfloat16", "--size", "64", "--repeats", "1",
                 "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["dtype"] == "bfloat16" and numbers["float32_reference"]["dtype"] == "float32"
    agreement = numbers["agreement_with_float32"]
    assert 0 < agreement["vae_encode_latent_rel_err"] < 0.1 and 0 <= agreement["binary_iou"] <= 1
    assert set(numbers["speedup_over_float32"]) >= {"end_to_end", "unet", "vae_decode"}
    text = capsys.readouterr().out
    assert "bfloat16 vs float32, same run" in text and "binary IoU" in text


def test_cpu_vae_runs_channels_last_with_the_same_result():
    image, mask = _inputs()
    config = G4SegConfig(size=64, correspondence_grid=0)
    pipe = G4SegPipeline.tiny(dtype="float32")
    conv = next(m for m in pipe.components.vae.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    result = pipe.refine(image, mask, "cat", config)
    pipe.components.vae.to(memory_format=torch.contiguous_format)
    plain = pipe.refine(image, mask, "cat", config)
    assert np.abs(result.generated_pixels - plain.generated_pixels).max() < 1e-4
    assert np.abs(result.prob - plain.prob).max() < 1e-4


@pytest.mark.parametrize("vendor,flags,fast", [
    ("AuthenticAMD", {"avx512f", "avx512_bf16"}, True),  # measured 0.48-0.53 of the float32 time
    ("GenuineIntel", {"avx512f", "avx512_bf16", "avx512_fp16"}, False),  # measured 1.13 of it (no AMX)
    ("GenuineIntel", {"avx512_bf16", "amx_bf16", "amx_tile"}, True),
    ("AuthenticAMD", {"avx2"}, False),
    (None, {"avx512_bf16"}, False),
])
def test_bf16_is_auto_only_where_it_measured_faster(vendor, flags, fast):
    verdict, why = precision.bf16_verdict(vendor, flags)
    assert verdict is fast
    if vendor == "GenuineIntel" and not fast:
        assert "no amx_bf16" in why and "slower than float32" in why


def test_cpuinfo_gives_the_vendor_and_flags_of_the_first_cpu(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512_bf16 avx2\n\n"
                    "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu\n")
    assert precision._cpuinfo(str(info)) == ("GenuineIntel", {"fpu", "avx512_bf16", "avx2"})
    assert precision._cpuinfo(str(tmp_path / "missing")) == (None, None)
