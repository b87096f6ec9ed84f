"""G4Seg's gain on the toy world, measured with `g4seg eval` (issue 19; docs/EVALUATION.md, "The toy world").

    python tools/train_toyworld.py            # world + models (cached)
    python tools/toyworld_benchmark.py        # every run below -> build/toyworld/bench/<run>/, table.md
    python tools/toyworld_benchmark.py --runs defaults,emi_off --limit 24

Coarse masks: the project's synthetic protocols mixed over the held-out images
(toyworld.MIXED_PROTOCOLS: perturb-0.9/0.8/0.7, lowres-8, dilate-5, erode-5), so the paper's Table VII
buckets are all filled. Each run is one `g4seg eval` command, printed before it runs; its summary.json
feeds one row of the table. Every run shares the coarse masks and the G4Seg noise seed, so the
differences between rows are paired.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ["--size", "128", "--dtype", "float32"]  # the toy world's 128 px images at their own size
# name -> (G4Seg flags, methods)
RUNS = {
    "defaults": ([], "none,densecrf,g4seg,g4seg+densecrf"),
    "generated_to_original": (["--direction", "generated_to_original"], "g4seg"),
    "emi_off": (["--emi-mode", "off"], "g4seg"),
    "additive": (["--emi-mode", "additive"], "g4seg"),
    "beta_0.6": (["--beta", "0.6"], "g4seg"),
    "beta_0.9": (["--beta", "0.9"], "g4seg"),
    "band_0.1_0.7": (["--band", "0.1", "0.7"], "g4seg"),
    "timestep_200": (["--timestep", "200"], "g4seg"),
    "timestep_600": (["--timestep", "600"], "g4seg"),
    # soften_width is in working-size pixels: 8 at --size 128 softens 4x more, relative to the image, than at 512
    "soften_2": (["--soften-width", "2"], "g4seg"),
    # the toy UNet barely follows the mask at the defaults (tools/toyworld_diagnose.py: steering 0.01):
    # a 10x stronger injection tests the direction where the generation does move
    "emi_strong": (["--cross-weight", "10", "--self-weight", "3"], "g4seg"),
    "emi_strong_generated_to_original": (["--cross-weight", "10", "--self-weight", "3",
                                          "--direction", "generated_to_original"], "g4seg"),
}


def eval_command(name, world, coarse, models, out, limit):
    flags, methods = RUNS[name]
    return [sys.executable, "-m", "g4seg_core.commands.main", "eval", str(world), "--split", "val",
            "--class-names", str(world / "class_names.txt"), "--num-classes", "6", "--coarse", str(coarse),
            "--methods", methods, "--checkpoint", str(models / "sd"), "--clip", str(models / "clip_vision.safetensors"),
            "--limit", str(limit), "--out", str(out / name), "--no-progress", *BASE, *flags]


def row(name, method, summary):
    r = summary["methods"][method]
    b = r["buckets"]
    cell = lambda k: "-" if b[k]["gain"] is None else f"{b[k]['gain']:+.2f}"  # noqa: E731
    label = name if method == "g4seg" else f"{name}: {method}"
    return (f"| {label} | {r['before']['miou']:.2f} | {r['after']['miou']:.2f} | {r['gain']['miou']:+.2f} | "
            f"{r['before']['boundary_iou']:.2f} | {r['after']['boundary_iou']:.2f} | {r['gain']['boundary_iou']:+.2f} | "
            f"{cell('0-40')} | {cell('40-80')} | {cell('80-100')} |")


def main(argv=None) -> int:
    from g4seg_core.evaluation.toyworld import write_mixed_coarse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=str(ROOT / "build" / "toyworld" / "world"))
    p.add_argument("--models", default=str(ROOT / "tests" / "data" / "toyworld"))
    p.add_argument("--out", default=str(ROOT / "build" / "toyworld" / "bench"))
    p.add_argument("--limit", type=int, default=48, help="held-out images (the first N of val)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    args = p.parse_args(argv)
    world, models, out = Path(args.world), Path(args.models), Path(args.out)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    coarse = out / "coarse"
    if not (coarse / "protocols.txt").is_file():
        write_mixed_coarse(world, coarse, "val", seed=0, limit=args.limit)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lines = ["| run | mIoU before | after | gain | BIoU before | after | gain | IoU 0-40 | 40-80 | 80-100 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    counts = None
    for name in runs:
        cmd = eval_command(name, world, coarse, models, out, args.limit)
        print("$", " ".join(cmd[1:]), flush=True)
        code = subprocess.call(cmd, env=env, cwd=str(ROOT))
        if code not in (0, 1):
            print(f"{name}: g4seg eval exited {code}", file=sys.stderr)
            continue
        summary = json.loads((out / name / "summary.json").read_text())
        for method in RUNS[name][1].split(","):
            if method != "none":
                lines.append(row(name, method, summary))
        b = summary["methods"]["none"]["buckets"] if "none" in summary["methods"] else next(
            iter(summary["methods"].values()))["buckets"]
        counts = counts or " / ".join(f"{k}: {v['samples']}" for k, v in b.items())
    table = "\n".join(lines) + f"\n\nSamples (image, class) per initial-IoU bucket: {counts}\n"
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
