"""bench/gpu.sh's argument handling and plan, by dry run (the CUDA run itself needs a GPU)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(*args, env=None):
    full = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=60)


def test_dry_run_plans_install_bench_and_comfy(tmp_path):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("")
    out = _run("--dry-run", "--python", sys.executable, "--out", str(tmp_path / "o"), env={"COMFYUI_PATH": str(comfy)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("pip install -q -e" in line for line in lines)
    assert any(f"pip install -q -r {comfy}/requirements.txt" in line for line in lines)
    bench = next(line for line in lines if "g4seg_core.commands.main bench" in line)
    assert "--device cuda --dtype auto --size 512 --batch 8" in bench
    assert "--compile --json" in bench  # eager vs compiled, with CUDA graphs (inductor)
    assert any("bench/text_to_mask.py --device cuda" in line for line in lines)
    assert any("bench/softening_device.py --device cuda --size 512 --batch 8" in line for line in lines)
    assert any("make_test_comfy_models.py --size full" in line for line in lines)
    assert any("compare_comfyui.py" in line and "--device cuda" in line for line in lines)
    assert any("bench/comfy_text.py --device cuda" in line for line in lines)
    assert not (tmp_path / "o").exists()  # a dry run runs nothing


def test_cpu_override_without_install_or_comfy(tmp_path):
    out = _run("--dry-run", "--no-install", "--skip-comfy", "--device", "cpu", "--size", "64", "--python",
               sys.executable, "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert "pip install" not in out.stdout and "compare_comfyui" not in out.stdout
    assert "--device cpu --dtype auto --size 64" in out.stdout
    assert "--compile --compile-backend eager" in out.stdout  # no CUDA graphs on a CPU: the tracing only
    assert "bench/text_to_mask.py --device cpu" in out.stdout


def test_compile_and_text_can_be_left_out(tmp_path):
    out = _run("--dry-run", "--no-install", "--skip-comfy", "--no-compile", "--skip-text", "--python", sys.executable,
               "--out", str(tmp_path / "o"))
    assert out.returncode == 0, out.stderr
    assert "--compile" not in out.stdout and "text_to_mask" not in out.stdout


@pytest.mark.parametrize("args,env,fragment", [
    (["--bogus"], {}, "unknown option --bogus"),
    (["--checkpoint", "x.safetensors"], {}, "give both --checkpoint and --clip"),
    ([], {"COMFYUI_PATH": "/nonexistent/ComfyUI"}, "has no main.py"),
])
def test_wrong_arguments_are_named(args, env, fragment):
    out = _run("--dry-run", "--python", sys.executable, *args, env=env)
    assert out.returncode == 2 and fragment in out.stderr
