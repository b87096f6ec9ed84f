"""The wheel is the product: what `pip install .` (or a release) gives must run on its own.

The wheel is built from a copy of the checkout, installed into an empty folder, and `g4seg refine`
and `g4seg segment` run from that folder in a fresh interpreter whose working directory is outside
the checkout, so neither the checkout nor an editable install can stand in for a missing file.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_BUILT_FROM = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                        "out", "bench_out", "g4seg_out", ".whl", ".gl", ".pytest_cache")


def _run(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(folder the wheel was installed into, the wheel's file names)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (pip install -e '.[test]')")
    base = tmp_path_factory.mktemp("wheel")
    source, wheels, target = base / "source", base / "wheels", base / "installed"
    shutil.copytree(ROOT, source, ignore=NOT_BUILT_FROM)  # the build writes build/ and *.egg-info next to its input
    # no build isolation: the test must not need the network (setuptools is a test extra)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
          "-w", str(wheels), str(source)])
    (wheel,) = glob.glob(str(wheels / "*.whl"))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "-q", "--target", str(target), wheel])
    return target, zipfile.ZipFile(wheel).namelist()


def _shipped_packages(names):
    return {os.path.dirname(n) for n in names if n.startswith("g4seg_core/") and n.endswith("/__init__.py")} | \
        ({"g4seg_core"} if "g4seg_core/__init__.py" in names else set())


def test_wheel_ships_every_subpackage_and_config(installed):
    _, names = installed
    on_disk = {os.path.relpath(os.path.dirname(p), ROOT)
               for p in glob.glob(os.path.join(ROOT, "g4seg_core", "**", "__init__.py"), recursive=True)}
    missing = on_disk - _shipped_packages(names)
    assert not missing, f"the wheel lacks the packages {sorted(missing)}: pyproject.toml's package discovery missed them"
    configs = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "g4seg_core", "configs", "*.json"))}
    shipped = {os.path.basename(n) for n in names if n.startswith("g4seg_core/configs/") and n.endswith(".json")}
    assert configs and configs <= shipped, f"the wheel lacks the configs {sorted(configs - shipped)}"


# Runs a console script with only the install folder to import this project from: an editable install's
# finder (setuptools puts one on sys.meta_path) would otherwise serve the subpackages the wheel lacks from
# the checkout. Every g4seg_core module loaded is then checked to come from the install folder.
FROM_INSTALL_ONLY = r"""
import os, runpy, sys
target, script = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
sys.argv = [script, *sys.argv[3:]]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    stray = sorted(f"{name}: {m.__file__}" for name, m in list(sys.modules.items())
                   if name.split(".")[0] == "g4seg_core" and getattr(m, "__file__", None)
                   and not os.path.realpath(m.__file__).startswith(os.path.realpath(target) + os.sep))
    if stray:
        sys.exit("modules loaded from outside the installed wheel: " + ", ".join(stray))
"""


def _g4seg(target, cwd, *args):
    """`g4seg ARGS` through the wheel's own console script, importing this project from the install folder only."""
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = target / "bin" / "g4seg"
    assert script.is_file(), f"the wheel installed no g4seg command: {sorted(os.listdir(target / 'bin'))}"
    return _run([sys.executable, "-c", FROM_INSTALL_ONLY, str(target), str(script), *args], cwd=cwd, env=env)


def test_installed_wheel_refines_and_segments_without_the_checkout(installed, tmp_path):
    target, _ = installed
    work = tmp_path / "work"  # cwd outside the checkout: `import g4seg_core` cannot find ROOT through ''
    work.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(work / "photo.png")
    mask = np.zeros((48, 64), np.uint8)
    mask[10:36, 12:44] = 255
    Image.fromarray(mask).save(work / "coarse.png")

    _g4seg(target, work, "refine", "photo.png", "coarse.png", "--label", "cat", "--out", "refined", "--selfcheck",
           "--size", "64")
    for name in ("photo_refined_prob.png", "photo_refined_mask.png", "photo_g4seg.json"):
        assert (work / "refined" / name).is_file(), name
    report = json.loads((work / "refined" / "photo_g4seg.json").read_text())
    assert report["models"].startswith("selfcheck")

    _g4seg(target, work, "segment", "photo.png", "--classes", "cat, dog", "--out", "segmented", "--refine",
           "--size", "64", "--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64",
           "--stride", "32")
    for name in ("photo.png", "photo_cat.png", "photo_dog.png", "photo_segment.json"):
        assert (work / "segmented" / name).is_file(), name
