"""Reruns know their models (issue 18.3) and named model paths stay named (18.7): --skip-existing counts the
model files (path, size, time), the self-check, device kind and dtype; a path the user gave that does not
exist is an error naming it, never random weights."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import g4seg_core.commands.refine as refine_command
import g4seg_core.commands.segment as segment_command
from g4seg_core.commands.main import main
from g4seg_core.pipeline import G4SegPipeline

SEG = ("--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32")


@pytest.fixture(autouse=True)
def no_model_env(monkeypatch, tmp_path):
    for var in ("G4SEG_CHECKPOINT", "G4SEG_CLIP", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)


def _pair(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / "i.png")
    m = np.zeros((48, 40), np.uint8)
    m[10:35, 8:30] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    return str(tmp_path / "i.png"), str(tmp_path / "m.png")


def _weights(tmp_path):
    """Stand-in model files: their identity is what --skip-existing compares (the loader is replaced)."""
    ckpt, clip = tmp_path / "sd.safetensors", tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"x" * 10)
    clip.write_bytes(b"y" * 10)
    return ckpt, clip


@pytest.fixture
def pipeline_builds(monkeypatch):
    calls = []

    def tiny(args, config):  # "real" weights: the tiny models, said to be the named files
        calls.append(args.selfcheck)
        return G4SegPipeline.tiny(), "selfcheck (random weights)" if args.selfcheck else f"weights: {args.checkpoint}"

    monkeypatch.setattr(refine_command, "build_pipeline", tiny)
    return calls


def _cpu_bf16(monkeypatch, native: bool):
    import g4seg_core.loading.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (native, "test CPU"))


def test_refine_skip_existing_knows_the_models(tmp_path, pipeline_builds, capsys, monkeypatch):
    _cpu_bf16(monkeypatch, True)  # auto is bfloat16 here: --dtype float32 is another run
    image, mask = _pair(tmp_path)
    ckpt, clip = _weights(tmp_path)
    base = ["refine", image, mask, "--label", "cat", "--out", str(tmp_path / "o"), "--size", "64", "--grid", "0",
            "--skip-existing"]
    real = base + ["--checkpoint", str(ckpt), "--clip", str(clip)]
    assert main(base + ["--selfcheck"]) == 0 and pipeline_builds == [True]
    assert main(real) == 0 and pipeline_builds == [True, False]  # the self-check result does not count
    report = json.loads((tmp_path / "o" / "i_g4seg.json").read_text())
    assert report["models_key"]["models"]["checkpoint"]["path"] == str(ckpt.resolve())
    assert main(real) == 0 and len(pipeline_builds) == 2         # same files: done
    assert "skipping 1 image(s)" in capsys.readouterr().err
    ckpt.write_bytes(b"x" * 11)                                  # another file at the same path
    assert main(real) == 0 and len(pipeline_builds) == 3
    assert main(real + ["--dtype", "float32"]) == 0 and len(pipeline_builds) == 4
    assert main(real + ["--dtype", "float32"]) == 0 and len(pipeline_builds) == 4
    assert main(base + ["--selfcheck", "--dtype", "float32"]) == 0 and len(pipeline_builds) == 5


def test_segment_skip_existing_knows_the_models(tmp_path, monkeypatch, capsys):
    from g4seg_core.models.tiny import tiny_text_to_mask

    loads = []

    def fake_load(args, config):
        loads.append(args.selfcheck)
        features, tower = tiny_text_to_mask()
        return features, tower, {"models": "weights", "random_weights": bool(args.selfcheck)}

    monkeypatch.setattr(segment_command, "load_models", fake_load)
    image, _ = _pair(tmp_path)
    ckpt, clip = _weights(tmp_path)
    base = ["segment", image, "--classes", "cat", "--out", str(tmp_path / "o"), "--skip-existing", *SEG]
    real = base + ["--text", str(ckpt), "--clip", str(clip)]
    assert main(base + ["--selfcheck"]) == 0 and loads == [True]
    assert main(real) == 0 and loads == [True, False]
    assert main(real) == 0 and len(loads) == 2
    os.utime(clip, ns=(1, 1))                                    # touched: another file for all we know
    assert main(real) == 0 and len(loads) == 3
    assert main(base + ["--selfcheck"]) == 0 and len(loads) == 4


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_skip_existing_knows_the_input_files(command, tmp_path, capsys):
    """A photo (or mask) replaced under the same name is another input: its earlier outputs were kept as done."""
    image, mask = _pair(tmp_path)
    out = str(tmp_path / "o")
    argv = (["refine", image, mask, "--label", "cat", "--out", out, "--size", "64", "--grid", "0"]
            if command == "refine" else ["segment", image, "--classes", "cat", "--out", out, *SEG])
    argv += ["--selfcheck", "--skip-existing"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0 and "skipping 1 image(s)" in capsys.readouterr().err
    changed = [image, mask] if command == "refine" else [image]
    for path in changed:
        os.utime(path, ns=(1, 1))  # as a new copy of another picture under the old name
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert "skipping" not in err and "overwriting the earlier outputs of 1 image(s)" in err, err


@pytest.mark.parametrize("command", ["refine", "segment"])
@pytest.mark.parametrize("flag", ["--clip", "--checkpoint"])
def test_a_named_path_that_does_not_exist_is_named(tmp_path, capsys, command, flag):
    image, mask = _pair(tmp_path)
    ckpt, clip = _weights(tmp_path)
    paths = {"--checkpoint": str(ckpt), "--clip": str(clip)}
    paths[flag] = str(tmp_path / "typo.safetensors")
    argv = (["refine", image, mask, "--label", "cat"] if command == "refine" else
            ["segment", image, "--classes", "cat", *SEG])
    argv += ["--out", str(tmp_path / "o"), "--checkpoint", paths["--checkpoint"], "--clip", paths["--clip"]]
    for extra in ([], ["--selfcheck-if-missing"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert f"{flag} {tmp_path / 'typo.safetensors'} does not exist" in err
        assert "RANDOM WEIGHTS" not in err and "no Stable Diffusion checkpoint" not in err
    assert not (tmp_path / "o").exists()


def test_env_paths_count_as_named(tmp_path, capsys, monkeypatch):
    image, mask = _pair(tmp_path)
    monkeypatch.setenv("G4SEG_CLIP", str(tmp_path / "gone.safetensors"))
    assert main(["segment", image, "--classes", "cat", "--out", str(tmp_path / "o"), "--selfcheck-if-missing",
                 *SEG]) == 2
    assert "$G4SEG_CLIP" in capsys.readouterr().err


def test_selfcheck_if_missing_never_replaces_a_named_models_partner(tmp_path, capsys):
    image, mask = _pair(tmp_path)
    ckpt, _ = _weights(tmp_path)
    assert main(["refine", image, mask, "--label", "cat", "--out", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                 "--comfyui-dir", str(tmp_path / "none"), "--selfcheck-if-missing"]) == 2
    err = capsys.readouterr().err
    assert "no CLIP image encoder found" in err and "--checkpoint" in err and "RANDOM WEIGHTS" not in err
    # nothing named: the self-check stands in, said loudly
    assert main(["refine", image, mask, "--label", "cat", "--out", str(tmp_path / "o"), "--comfyui-dir",
                 str(tmp_path / "none"), "--selfcheck-if-missing", "--size", "64", "--grid", "0"]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err


@pytest.mark.parametrize("native_bf16", [False, True])
def test_dtype_auto_and_the_dtype_it_picks_are_one_run(tmp_path, pipeline_builds, monkeypatch, native_bf16):
    """--skip-existing compares the dtype a run computes in, not the flag: on a CPU without native bfloat16,
    --dtype auto is float32."""
    _cpu_bf16(monkeypatch, native_bf16)
    image, mask = _pair(tmp_path)
    base = ["refine", image, mask, "--label", "cat", "--out", str(tmp_path / "o"), "--size", "64", "--grid", "0",
            "--skip-existing", "--selfcheck"]
    assert main(base) == 0 and len(pipeline_builds) == 1
    assert main(base + ["--dtype", "float32"]) == 0
    assert len(pipeline_builds) == (2 if native_bf16 else 1)  # the same dtype: done before
    report = json.loads((tmp_path / "o" / "i_g4seg.json").read_text())
    assert report["models_key"]["dtype"] == "float32"
    assert main(base + ["--dtype", "bfloat16"]) == 0 and len(pipeline_builds) == (3 if native_bf16 else 2)
    assert main(base) == 0 and len(pipeline_builds) == 3  # auto: bfloat16 (done just now) or float32 (redone)


def test_segment_key_records_the_clip_file_its_text_tower_would_pick(tmp_path, monkeypatch, capsys):
    """segment searches the CLIP image encoder for its text tower's width (an SDXL checkpoint pairs with
    clip_vision_g): the key must change when that file does, not only the plain pick (clip_vision_h)."""
    loads = []

    def fake_load(args, config):
        from g4seg_core.models.tiny import tiny_text_to_mask

        loads.append(1)
        features, tower = tiny_text_to_mask()
        return features, tower, {"models": "weights", "random_weights": False}

    monkeypatch.setattr(segment_command, "load_models", fake_load)
    comfy = tmp_path / "comfy"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "models" / "clip_vision").mkdir(parents=True)
    (comfy / "models" / "checkpoints" / "sd_xl_base.safetensors").write_bytes(b"x" * 10)
    (comfy / "models" / "clip_vision" / "clip_vision_h.safetensors").write_bytes(b"h" * 10)
    big_g = comfy / "models" / "clip_vision" / "clip_vision_g.safetensors"
    big_g.write_bytes(b"g" * 10)
    image, _ = _pair(tmp_path)
    argv = ["segment", image, "--classes", "cat", "--out", str(tmp_path / "o"), "--skip-existing",
            "--comfyui-dir", str(comfy), *SEG]
    assert main(argv) == 0 and main(argv) == 0 and len(loads) == 1   # same files: done
    key = json.loads((tmp_path / "o" / "i_segment.json").read_text())["rerun_key"]["models"]["models"]
    assert key["clip"]["path"].endswith("clip_vision_h.safetensors")
    assert key["clip_for_text_width_1280"]["path"] == str(big_g.resolve())
    big_g.write_bytes(b"G" * 11)                                     # the file an SDXL text tower pairs with
    assert main(argv) == 0 and len(loads) == 2
