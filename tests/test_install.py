"""What a ComfyUI user installs and what ComfyUI sees at start (no ComfyUI needed).

The pack is imported in a fresh Python the way ComfyUI's loader does it (spec from the
folder's __init__.py), with some modules made unimportable, to check that a failed import
is raised with its cause (ComfyUI then prints IMPORT FAILED) and that the nodes import
nothing heavy that ComfyUI's own requirements lack.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("diffusers", "transformers", "open_clip", "timm", "accelerate", "huggingface_hub")

LOAD_AS_COMFYUI = r"""
import importlib.abc, importlib.util, json, os, sys
root, blocked = sys.argv[1], set(sys.argv[2].split(",")) - {""}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location(root.replace(".", "_x_"), os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
try:
    spec.loader.exec_module(module)
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
else:
    print(json.dumps({"nodes": sorted(module.NODE_CLASS_MAPPINGS), "web": module.WEB_DIRECTORY,
                      "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _load(*blocked):
    out = subprocess.run([sys.executable, "-c", LOAD_AS_COMFYUI, ROOT, ",".join(blocked)], capture_output=True,
                         text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_failed_import_is_raised_with_its_cause():
    res = _load("PIL")
    assert "error" in res, "a failed import must reach ComfyUI (it then marks the pack IMPORT FAILED)"
    assert "ImportError" in res["error"] and "'PIL'" in res["error"] and "requirements.txt" in res["error"], res


def test_nodes_load_without_heavy_packages_and_import_none():
    res = _load(*HEAVY)
    assert "error" not in res, res
    assert len(res["nodes"]) >= 8 and all(n.startswith("G4Seg") for n in res["nodes"])
    assert not set(HEAVY) & set(res["modules"])
    assert res["web"] == "./web"


def _requirement_names(path):
    names = []
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    return names


def test_requirements_txt_is_light():
    """ComfyUI-Manager installs requirements.txt into ComfyUI's Python: nothing the nodes do not import."""
    names = _requirement_names(os.path.join(ROOT, "requirements.txt"))
    assert not {"diffusers", "transformers", "open_clip_torch", "timm", "torch", "torchvision"} & set(names), names


def test_registry_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"], comfy
    icon = comfy["Icon"].split("/main/", 1)[1]
    assert os.path.exists(os.path.join(ROOT, icon)), f"Icon points to {icon}, which is not in the repository"
    assert project["project"]["license"] == {"file": "LICENSE"}
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    ignored = open(os.path.join(ROOT, ".comfyignore")).read().split()
    for folder in ("tests/", "bench/", "tools/"):
        assert folder in ignored, f".comfyignore must keep {folder} out of the published package"


def test_every_node_has_a_help_page_naming_its_inputs():
    """ComfyUI's page shows web/docs/<node id>.md as the node's help (written by tools/make_node_docs.py)."""
    from nodes import NODE_CLASS_MAPPINGS

    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        path = os.path.join(ROOT, "web", "docs", f"{node_id}.md")
        assert os.path.exists(path), f"no help page {path}: run python tools/make_node_docs.py"
        text = open(path).read()
        for section in cls.INPUT_TYPES().values():
            for name in section:
                assert f"`{name}`" in text, f"{path} does not list input {name}: run python tools/make_node_docs.py"


def test_tests_run_in_a_clone_named_like_the_repository(tmp_path):
    """A user's clone is named ComfyUI-G4Seg, not a Python identifier: pytest then imports the root
    __init__.py as a lone module (no package), which must not break collection."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot copy the tracked files")
    clone = tmp_path / "ComfyUI-G4Seg"
    for name in filter(None, listed.stdout.decode().split("\0")):
        if name.startswith(("tests/", "g4seg_core/", "nodes/")) or "/" not in name:
            target = clone / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(ROOT, name), target)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_knobs.py"],
                         cwd=clone, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout
