"""Seconds per image: the core pipeline vs the G4SegRefine node in a real ComfyUI, same run.

Both load the same two files (an SD checkpoint and a CLIP vision file from ComfyUI's model
folders) and refine the same-size image with the same parameters, one after the other:

    COMFYUI_PATH=/path/ComfyUI python bench/compare_comfyui.py \
        --checkpoint /path/ComfyUI/models/checkpoints/sd21.safetensors \
        --clip /path/ComfyUI/models/clip_vision/clip_vision_l.safetensors [--comfy-python PY] [--size 512]

Random-weight files of the right architecture (tools/make_test_comfy_models.py --size full)
cost the same compute as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def core_seconds(checkpoint: str, clip: str, size: int, runs: int) -> dict:
    import numpy as np
    import torch

    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    start = time.perf_counter()
    pipe = G4SegPipeline.from_pretrained(checkpoint, clip=clip, device="cpu")
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    config = G4SegConfig(size=size)
    times, stages = [], None
    for i in range(runs):
        start = time.perf_counter()
        result = pipe.refine(image, mask, "cat", config.replace(seed=i))
        times.append(time.perf_counter() - start)
        stages = result.timings
    return {"load_s": load_s, "seconds_per_image": times, "stages_last_run_s": stages,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--comfy-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2, help="the first run includes warm-up")
    args = parser.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    core = core_seconds(args.checkpoint, args.clip, args.size, args.runs)
    print("core:", json.dumps(core), flush=True)
    script = ROOT / "tests" / "integration" / "comfy_inprocess.py"
    out = subprocess.run([args.comfy_python, str(script), "bench", args.checkpoint, args.clip, str(args.size),
                          str(args.runs)], capture_output=True, text=True, check=True)
    node = json.loads(out.stdout.strip().splitlines()[-1])
    print("comfyui G4SegRefine:", json.dumps(node), flush=True)
    core_s, node_s = min(core["seconds_per_image"]), min(node["seconds_per_image"])
    print(f"\n{args.size}x{args.size} CPU, best of {args.runs}: core {core_s:.1f} s/image, "
          f"ComfyUI G4SegRefine {node_s:.1f} s/image, node/core = {node_s / core_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
