"""G4SegTextToMask in a real ComfyUI (skipped unless COMFYUI_PATH points to a checkout).

    COMFYUI_PATH=/work/ComfyUI [COMFYUI_PYTHON=/work/venv/bin/python] pytest tests/integration/test_text_to_mask.py

Runs text_to_mask_inprocess.py in ComfyUI's Python: tiny random towers built with ComfyUI's own
classes (SD2ClipModel, ClipVisionModel) and loaded from the same weights the core reads from files.
"""

import json
import os
import subprocess
import sys

import pytest

COMFY = os.environ.get("COMFYUI_PATH")
HERE = os.path.dirname(os.path.abspath(__file__))
if not COMFY or not os.path.exists(os.path.join(COMFY, "main.py")):
    pytest.skip("COMFYUI_PATH is not set to a ComfyUI checkout", allow_module_level=True)
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)


def test_node_equals_core_and_refuses_a_missing_projection(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=COMFY, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([PYTHON, os.path.join(HERE, "text_to_mask_inprocess.py"), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["missing_text"] == [] and out["missing_vision"] == []
    assert out["masks"] == [3, 72, 100] and out["label_map"] == [1, 72, 100, 3]
    assert out["names"] == "cat, potted plant (indoor), person"
    assert out["prob_max_diff"] < 1e-4  # node == core on the same weights
    assert out["text_batched_vs_one_by_one_max_diff"] <= 1e-5 * max(1.0, out["text_scale"])  # float32 round-off
    assert out["label_agreement"] > 0.999
    assert "no text_projection" in out["no_projection"]


def test_words_to_refined_label_map_on_comfyui_loaded_models():
    """Text to Mask -> Refine Classes on ComfyUI's own loaders: the SD2.1 test checkpoint (its CLIP with a
    text_projection) and the ViT-H/14 test CLIP vision file, as the words workflows wire them."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools"))
    from make_test_comfy_models import has_text_projection

    models = os.path.join(COMFY, "models")
    ckpt = os.path.join(models, "checkpoints", "g4seg_test_sd21_tiny.safetensors")
    text = os.path.join(models, "diffusers", "g4seg_test_sd21_tiny", "text_encoder", "model.safetensors")
    vith = os.path.join(models, "clip_vision", "g4seg_test_vith14.safetensors")
    if not (os.path.exists(ckpt) and os.path.exists(vith) and os.path.exists(text) and has_text_projection(text)):
        pytest.skip("test models with a text_projection and a ViT-H/14 are missing: run "
                    "`python tools/make_test_comfy_models.py --size tiny --vith` with COMFYUI_PATH set")
    env = dict(os.environ, COMFYUI_PATH=COMFY, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([PYTHON, os.path.join(HERE, "text_to_mask_inprocess.py"), "loaders", ckpt, vith], env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"masks": [2, 64, 80], "label_map": [1, 64, 80, 3], "names": "cat, sofa", "refined": [2, 64, 80],
                   "fused": [1, 64, 80, 3], "finite": True}
