"""Integration tests against a real ComfyUI (skipped unless COMFYUI_PATH points to a checkout).

    COMFYUI_PATH=/work/ComfyUI COMFYUI_PYTHON=/work/venv/bin/python pytest tests/integration

Fixtures (conftest.py): random-weight SD2.1-architecture test models built by
tools/make_test_comfy_models.py, and one `main.py --cpu` server whose only custom node pack is
this repository. Here: the pack loads (and a broken import is marked IMPORT FAILED with its
cause), every shipped workflow's links and types agree with the live /object_info, the attention
patch chains with another pack's, and node and core give the same refinement. The workflows
are loaded, checked and run through the real page in test_page.py.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from comfy_server import (CKPT, CLIP_VISION, PYTHON, comfy_available, comfy_env, make_base,  # noqa: E402
                          start_comfyui, stop_comfyui)
from test_workflows import validate_workflow  # noqa: E402

OUR_IDS = ["G4SegLoadCoarseMask", "G4SegInjectAttention", "G4SegOneStepDenoise", "G4SegCLIPCorrespondence",
           "G4SegMixForeground", "G4SegRefine", "G4SegMaskToSegPalette", "G4SegDenseCRF"]

# main.py with one module made unimportable, as when a dependency is missing from ComfyUI's Python.
MAIN_WITH_BLOCKED_IMPORT = r"""
import importlib.abc, runpy, sys
blocked = "g4seg_core"
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (made unimportable by the test)", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["main.py"] + sys.argv[1:]
runpy.run_path("main.py", run_name="__main__")
"""


def test_pack_loads_and_nodes_listed(server):
    info = server["info"]
    for node_id in OUR_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        assert info[node_id]["display_name"].endswith("(G4Seg)")
        assert info[node_id]["category"] == "G4Seg"
    log = open(server["log"]).read()
    assert "(IMPORT FAILED): " + os.path.join(server["base"], "custom_nodes", "ComfyUI-G4Seg") not in log


def test_broken_import_is_marked_import_failed_with_its_cause(tmp_path):
    ok, why = comfy_available()
    if not ok:
        pytest.skip(why)
    base = make_base(str(tmp_path / "base"))
    log_path = str(tmp_path / "server.log")
    proc, url, info, log = start_comfyui(base, log_path, python_args=["-c", MAIN_WITH_BLOCKED_IMPORT])
    stop_comfyui(proc, log)
    text = open(log_path).read()
    pack = os.path.join(base, "custom_nodes", "ComfyUI-G4Seg")
    assert "(IMPORT FAILED): " + pack in text, text[-3000:]
    assert "ComfyUI-G4Seg cannot load its nodes: No module named 'g4seg_core" in text, text[-3000:]
    assert "requirements.txt" in text and not any(n in info for n in OUR_IDS)


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(ROOT, "example_workflows")) if f.endswith(".json")))
def test_workflow_validates_against_object_info(server, name):
    with open(os.path.join(ROOT, "example_workflows", name)) as f:
        wf = json.load(f)
    errors = validate_workflow(wf, server["info"])
    assert not errors, "\n".join(errors)


def _inprocess(mode, *paths):
    """Run comfy_inprocess.py MODE PATHS... in ComfyUI's Python; its last stdout line is JSON."""
    out = subprocess.run([PYTHON, os.path.join(HERE, "comfy_inprocess.py"), mode, *paths],
                         capture_output=True, text=True, env=comfy_env(), timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_patch_chains_with_other_attention_patch(models):
    res = _inprocess("chain", os.path.join(models, "checkpoints", CKPT), os.path.join(models, "clip_vision", CLIP_VISION))
    assert res["wrapped"] and res["calls"]["other"] == res["blocks"] and res["calls"]["g4seg"] == 2 * res["blocks"]
    assert res["changed"] > 0


def test_node_and_core_give_the_same_refinement(models):
    """Same weights through ComfyUI (single-file checkpoint) and the core (diffusers folder): same masks."""
    res = _inprocess("parity", os.path.join(models, "checkpoints", CKPT),
                     os.path.join(models, "diffusers", CKPT.replace(".safetensors", "")),
                     os.path.join(models, "clip_vision", CLIP_VISION))
    assert res["changed_fraction"] > 0.01, res  # the refinement did move pixels
    assert res["prob_max_diff"] < 1e-3 and res["binary_agreement"] > 0.999, res
    assert res["generated_max_diff"] < 0.01, res  # the core's generated image is rounded to uint8


def test_node_and_core_agree_where_they_used_to_drift(models, tmp_path):
    """One flow: a non-square image both resize, a batch of two images with two masks, CFG 3, a class
    name with parentheses and v-prediction give the same maps through ComfyUI and the core (same weights and seed); and
    LoadImage -> G4SegRefine equals `g4seg refine` on the same PNG files (8-bit outputs within 2/255)."""
    res = _inprocess("drift", os.path.join(models, "checkpoints", CKPT),
                     os.path.join(models, "diffusers", CKPT.replace(".safetensors", "")),
                     os.path.join(models, "clip_vision", CLIP_VISION), str(tmp_path))
    for case in ("non_square_resized", "batch_two_images_two_masks", "cfg_3", "class_name_with_parentheses",
                 "v_prediction"):
        r = res[case]
        assert r["changed_fraction"] > 0.005, (case, r)  # the refinement did move pixels
        assert r["prob_max_diff"] < 1e-3 and r["binary_agreement"] > 0.999, (case, r)
        assert r["generated_max_diff"] < 1e-3, (case, r)
    cli = res["node_vs_cli_320x240_size256_dtype_float32"]  # ComfyUI computes in float32 on a CPU
    assert cli["changed_fraction"] > 0.005 and cli["max_8bit_diff"] <= 2, cli
    auto = res["node_vs_cli_320x240_size256_dtype_auto"]  # the CLI's default dtype also runs there
    assert auto["cli_dtype_used"] in ("float32", "bfloat16") and auto["changed_fraction"] > 0.005, auto


def test_one_image_many_masks_matches_one_by_one(models):
    res = _inprocess("broadcast", os.path.join(models, "checkpoints", CKPT),
                     os.path.join(models, "clip_vision", CLIP_VISION))
    assert res["shape"] == [2, 64, 64], res
    assert max(res["generated_diff"]) < 2e-3 < res["wrong_seed_generated_diff"], res  # mask i really got seed + i
    assert min(res["binary_agreement"]) > 0.99 and max(res["diff"]) < 0.1, res


def test_refine_under_comfyui_bf16_switches(models):
    """--bf16-unet --bf16-vae --bf16-text-enc: the pack runs, the dtypes are ComfyUI's, the masks stay close."""
    res = _inprocess("lowprec", os.path.join(models, "checkpoints", CKPT),
                     os.path.join(models, "clip_vision", CLIP_VISION))
    low = res["dtypes"]["bf16"]
    assert low["unet_weights"] == low["vae"] == low["text_encoder_weights"] == "torch.bfloat16", res
    assert res["finite"], res
    assert res["prob_max_diff"] < 0.25 and res["binary_iou"] > 0.9, res
