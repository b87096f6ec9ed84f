"""Outputs of two commits on the same weights, inputs and seed (float32): are the refined probabilities unchanged?

    python bench/compare_commits.py --old main --new WORKTREE   # WORKTREE: the checkout as it is now
    python bench/compare_commits.py --old 4f56120 --new HEAD --full-size

Each side runs in its own detached `git worktree` (the working tree itself for WORKTREE) with PYTHONPATH set
to it, refines the same cases (tiny random-weight models; with --full-size also the SD2.1 architecture with
random weights at 128x128: the bench's models) and saves the results; the script then prints, per case, the
largest refined-probability and generated-pixel differences. Only the public API is used
(G4SegPipeline.refine_batch), so any two commits since it existed compare.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _inputs(count: int, size: int):
    rng = np.random.default_rng(7)
    images, masks = [], []
    for i in range(count):
        images.append((rng.random((size, size, 3)) * 255).astype(np.uint8))
        mask = np.zeros((size, size), np.float32)
        a, b = size // 6 + 3 * i, size // 2 + 5 * i
        mask[a:b + size // 4, a + 2:b + size // 3] = 1.0
        if i % 2:  # a soft map too
            mask = np.clip(mask * 0.7 + rng.random((size, size)).astype(np.float32) * 0.2, 0, 1)
        masks.append(mask)
    return images, masks


CASES = {
    # name: (family or "full", batch, labels, config overrides)
    "sd21_dd_b1": ("sd21", 1, ["cat"], {}),
    "sd21_add_b1": ("sd21", 1, ["cat"], {"emi_mode": "additive"}),
    "sd21_dd_cfg": ("sd21", 2, ["cat", "dog"], {"cfg_scale": 3.0}),
    "sd21_dd_b3_labels": ("sd21", 3, ["cat", "dog", "potted plant"], {}),
    "sd21_add_b3_labels": ("sd21", 3, ["cat", "dog", "potted plant"], {"emi_mode": "additive"}),
    "sd21_t5_grid": ("sd21", 2, ["cat", "dog"], {"emi_schedule": "t5", "correspondence_grid": 32}),
    "sd21_off": ("sd21", 2, ["cat", "dog"], {"emi_mode": "off"}),
    "sdxl_dd_b2_labels": ("sdxl", 2, ["cat", "dog"], {}),
    "full_dd_b1": ("full", 1, ["cat"], {"size": 128}),
    "full_dd_b2_labels": ("full", 2, ["cat", "dog"], {"size": 128}),
    "full_add_b2_labels": ("full", 2, ["cat", "dog"], {"size": 128, "emi_mode": "additive"}),
}


def run_cases(out: Path, full_size: bool, only=()) -> None:
    import torch

    from g4seg_core.config import G4SegConfig
    from g4seg_core.pipeline import G4SegPipeline

    torch.manual_seed(0)
    pipes = {}
    results = {}
    for name, (family, batch, labels, overrides) in CASES.items():
        if (family == "full" and not full_size) or (only and name not in only):
            continue
        if family not in pipes:
            if family == "full":
                from g4seg_core.commands.bench import bench_models

                components, clip = bench_models()
                pipes[family] = G4SegPipeline(components, clip, device="cpu", dtype="float32")
            else:
                pipes[family] = G4SegPipeline.tiny(family=family, device="cpu", dtype="float32")
        config = G4SegConfig(**{"size": 64, **overrides})
        images, masks = _inputs(batch, 96 if family != "full" else 160)
        refined = pipes[family].refine_batch(images, masks, labels, config)
        for i, r in enumerate(refined):
            results[f"{name}/{i}/prob"] = r.prob
            results[f"{name}/{i}/generated"] = r.generated_pixels
        print(name, flush=True)
    np.savez(out, **results)


def _tree(rev: str, holder: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT
    path = holder / rev.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="main")
    parser.add_argument("--new", default="WORKTREE")
    parser.add_argument("--full-size", action="store_true", help="also the SD2.1 architecture (random weights)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--run-into", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_into:
        run_cases(Path(args.run_into), args.full_size, [c for c in args.cases.split(",") if c])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        holder = Path(tmp)
        outputs, trees = {}, []
        try:
            for side, rev in (("old", args.old), ("new", args.new)):
                tree = _tree(rev, holder)
                if tree != ROOT:
                    trees.append(tree)
                outputs[side] = holder / f"{side}.npz"
                env = dict(os.environ, PYTHONPATH=str(tree))
                subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-into", str(outputs[side])]
                               + (["--full-size"] if args.full_size else []) + ["--cases", args.cases],
                               cwd=tree, env=env, check=True)
            old, new = np.load(outputs["old"]), np.load(outputs["new"])
            report = {}
            for key in sorted(old.files):
                case, _, what = key.rpartition("/")
                case = case.rsplit("/", 1)[0]
                diff = float(np.abs(old[key].astype(np.float64) - new[key]).max())
                entry = report.setdefault(case, {})
                entry[what] = max(entry.get(what, 0.0), diff)
            print(json.dumps({"old": args.old, "new": args.new, "max_abs_diff": report}, indent=2))
            worst = max(v["prob"] for v in report.values())
            print(f"largest refined-probability difference over all cases: {worst:.3g}")
        finally:
            for tree in trees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
