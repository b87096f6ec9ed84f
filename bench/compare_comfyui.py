"""Seconds per image: the core pipeline vs the G4SegRefine node in a real ComfyUI, same run.

Both load the same two files (an SD checkpoint and a CLIP vision file from ComfyUI's model
folders) and refine the same-size image with the same parameters. Shared machines drift by
tens of percent over minutes, so the sides alternate: each round starts, per variant, a fresh
core process, then a fresh ComfyUI process, each loading the models and refining `--runs`
times (the first run of each process is warm-up and not counted):

    COMFYUI_PATH=/path/ComfyUI python bench/compare_comfyui.py \\
        --checkpoint /path/ComfyUI/models/checkpoints/sd21.safetensors \\
        --clip /path/ComfyUI/models/clip_vision/clip_vision_l.safetensors [--comfy-python PY] [--size 512] \\
        [--variants default,bf16]

Variants (--variants, comma-separated): `default` = ComfyUI's own dtypes against the core in
the dtype ComfyUI computes in there (float32 on CPU, float16 on a GPU); `bf16` = ComfyUI with
--bf16-unet --bf16-vae --bf16-text-enc against the core in bfloat16; `fp16` = the --fp16-*
switches against the core in float16 (GPUs).

Random-weight files of the right architecture (tools/make_test_comfy_models.py --size full)
cost the same compute as real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


VARIANTS = {  # name: (core dtype, ComfyUI switches); None = the dtype ComfyUI computes in by default
    "default": (None, []),
    "bf16": ("bfloat16", ["--bf16-unet", "--bf16-vae", "--bf16-text-enc"]),
    "fp16": ("float16", ["--fp16-unet", "--fp16-vae", "--fp16-text-enc"]),
}


def core_seconds(checkpoint: str, clip: str, size: int, runs: int, device: str, dtype=None) -> dict:
    import numpy as np
    import torch

    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    start = time.perf_counter()
    # default: the dtype ComfyUI computes in on that device, fp32 on CPU, fp16 on a GPU
    dtype = dtype or ("float32" if device == "cpu" else "float16")
    pipe = G4SegPipeline.from_pretrained(checkpoint, clip=clip, device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    image = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    config = G4SegConfig(size=size)
    times, stages = [], []
    for i in range(runs):
        start = time.perf_counter()
        result = pipe.refine(image, mask, "cat", config.replace(seed=i))
        times.append(time.perf_counter() - start)
        stages.append(result.timings)
    return {"device": device, "dtype": dtype, "load_s": load_s, "seconds_per_image": times, "stages_s": stages,
            "threads": torch.get_num_threads()}


def _last_json_line(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_worker(command, env=None) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(command[:3])} ...):\n{out.stderr[-3000:]}")
    return _last_json_line(out.stdout)


def summary(samples) -> str:
    return f"median {statistics.median(samples):.1f} s, best {min(samples):.1f} s, n={len(samples)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--comfy-python", default=os.environ.get("COMFYUI_PYTHON", sys.executable))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2, help="refines per process; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="alternating core/ComfyUI process pairs")
    parser.add_argument("--device", default=None,
                        help="core side: cuda when available, else cpu (ComfyUI picks its own the same way)")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated, each run in every round: {', '.join(VARIANTS)} (default: default)")
    parser.add_argument("--core-dtype", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--worker-core", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be >= 2 (the first run of each process is warm-up)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants {args.variants!r}: choose from {', '.join(VARIANTS)}")
    if args.worker_core:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(core_seconds(args.checkpoint, args.clip, args.size, args.runs, device, args.core_dtype)),
              flush=True)
        return 0
    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    if args.json:
        from g4seg_core.errors import G4SegError
        from g4seg_core.files.output_files import prepare_output_file

        try:  # before the many minutes of measuring
            prepare_output_file(args.json, "--json")
        except G4SegError as exc:
            parser.error(str(exc))
    core_cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-core", "--checkpoint", args.checkpoint,
                "--clip", args.clip, "--size", str(args.size), "--runs", str(args.runs)]
    if args.device:
        core_cmd += ["--device", args.device]
    node_cmd = [args.comfy_python, str(ROOT / "tests" / "integration" / "comfy_inprocess.py"), "bench",
                args.checkpoint, args.clip, str(args.size), str(args.runs)]
    rounds = []
    for r in range(args.rounds):
        entry = {}
        for name in variants:
            dtype, flags = VARIANTS[name]
            core = run_worker(core_cmd + (["--core-dtype", dtype] if dtype else []))
            print(f"round {r + 1} {name} core:", json.dumps(core), flush=True)
            node = run_worker(node_cmd, env=dict(os.environ, G4SEG_COMFY_FLAGS=" ".join(flags)))
            print(f"round {r + 1} {name} comfyui G4SegRefine {' '.join(flags)}:", json.dumps(node), flush=True)
            entry[name] = {"core": core, "node": node}
        rounds.append(entry)
    device = rounds[0][variants[0]]["core"]["device"]
    results = {}
    for name in variants:
        core_s = [s for rd in rounds for s in rd[name]["core"]["seconds_per_image"][1:]]
        node_s = [s for rd in rounds for s in rd[name]["node"]["seconds_per_image"][1:]]
        results[name] = {"core_s": core_s, "node_s": node_s, "core_dtype": rounds[0][name]["core"]["dtype"],
                         "comfy_flags": VARIANTS[name][1], "comfy_dtypes": rounds[0][name]["node"].get("dtypes"),
                         "node_over_core_median": statistics.median(node_s) / statistics.median(core_s)}
        print(f"\n{args.size}x{args.size} {device}, {name} (core {results[name]['core_dtype']}, ComfyUI "
              f"{' '.join(VARIANTS[name][1]) or 'default switches'}), warm runs only: core {summary(core_s)}; "
              f"ComfyUI G4SegRefine {summary(node_s)}; node/core (medians) = "
              f"{results[name]['node_over_core_median']:.2f}")
        if results[name]["comfy_dtypes"]:
            print(f"  ComfyUI computed in: {json.dumps(results[name]['comfy_dtypes'])}")
    base = variants[0]
    for name in variants[1:]:
        for side in ("core", "node"):
            ratio = statistics.median(results[base][f"{side}_s"]) / statistics.median(results[name][f"{side}_s"])
            results[name][f"{side}_speedup_over_{base}"] = ratio
        print(f"{name} vs {base}, same rounds: core {results[name][f'core_speedup_over_{base}']:.2f}x, "
              f"ComfyUI node {results[name][f'node_speedup_over_{base}']:.2f}x faster")
    if args.json:
        from g4seg_core.files.output_files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"rounds": rounds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
