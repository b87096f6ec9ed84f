"""Where G4Seg's mechanism works or breaks on the toy world: pictures and three numbers per setting.

    python tools/toyworld_diagnose.py --limit 12 --out build/toyworld/diagnose [--emi-mode off ...]

For each (held-out image, class) with the mixed coarse masks of tools/toyworld_benchmark.py:
  * steering: does the injected mask change the generation? mean |generated(EMI) - generated(EMI off)|
    inside vs outside the coarse mask;
  * correspondence: the share of pixels whose match (the delta of the mixing) carries the same
    ground-truth label as the pixel itself (1.0 = the match never crosses an object boundary);
  * band: the share of the coarse mask's wrong pixels (binary coarse != ground truth) that lie in
    the coarse-filtering band after softening, i.e. that G4Seg is allowed to change at all;
and a picture per image (image | coarse | generation with EMI | generation without | refined | truth)
from g4seg_core.files.visualize.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from PIL import Image

    from g4seg_core.config import G4SegConfig
    from g4seg_core.evaluation.datasets import VOCStyleDataset
    from g4seg_core.evaluation.toyworld import CLASS_NAMES, write_mixed_coarse
    from g4seg_core.files.visualize import COARSE_COLOR, overlay
    from g4seg_core.pipeline import G4SegPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=str(ROOT / "build" / "toyworld" / "world"))
    p.add_argument("--models", default=str(ROOT / "tests" / "data" / "toyworld"))
    p.add_argument("--out", default=str(ROOT / "build" / "toyworld" / "diagnose"))
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--set", action="append", default=[], help="config override KEY=JSON, e.g. direction='\"generated_to_original\"'")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    coarse = out / "coarse"
    if not (coarse / "protocols.txt").is_file():
        write_mixed_coarse(args.world, coarse, "val", seed=0, limit=args.limit)
    protocols = dict(line.split("\t") for line in (coarse / "protocols.txt").read_text().splitlines())
    ds = VOCStyleDataset(args.world, split="val", coarse_dir=str(coarse), num_classes=len(CLASS_NAMES),
                         class_names=CLASS_NAMES, limit=args.limit)
    pipe = G4SegPipeline.from_pretrained(str(Path(args.models) / "sd"),
                                         clip=str(Path(args.models) / "clip_vision.safetensors"), device="cpu",
                                         dtype="float32")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    if "band" in overrides:
        overrides["band"] = tuple(overrides["band"])
    config = G4SegConfig(size=128, dtype="float32", **overrides).validate()
    off = replace(config, emi_mode="off")
    rows = []
    for sid in ds.ids:
        s = ds.load(sid)
        strips = []
        for c, mask in s.coarse.items():
            r = pipe.refine(s.image, mask, s.labels[c], config)
            r_off = pipe.refine(s.image, mask, s.labels[c], off)
            truth = s.gt == c
            m = mask >= 0.5
            diff = np.abs(r.generated_pixels - r_off.generated_pixels).mean(-1)
            h, w = truth.shape
            gh, gw = r.correspondence.shape
            # grid match -> which grid cell each grid cell reads; compare the truth at both cells
            cells = np.arange(gh * gw).reshape(gh, gw)
            ys, xs = (np.arange(gh) * h // gh + h // gh // 2), (np.arange(gw) * w // gw + w // gw // 2)
            truth_grid = truth[np.ix_(ys, xs)]
            matched = truth_grid.reshape(-1)[r.correspondence.reshape(-1)].reshape(gh, gw)
            wrong = m != truth
            lo, hi = config.band
            in_band = (r.coarse >= lo) & (r.coarse <= hi)
            iou = lambda a: (a & truth).sum() / max(1, (a | truth).sum())  # noqa: E731
            rows.append({"id": sid, "class": s.labels[c], "protocol": protocols[sid],
                         "iou_before": float(iou(m)), "iou_after": float(iou(r.binary)),
                         "steer_inside": float(diff[m].mean()) if m.any() else None,
                         "steer_outside": float(diff[~m].mean()) if (~m).any() else None,
                         "match_same_label": float((matched == truth_grid).mean()),
                         "match_is_identity": float((r.correspondence == cells).mean()),
                         "errors_in_band": float(in_band[wrong].mean()) if wrong.any() else None})
            tiles = [s.image, overlay(s.image, mask, COARSE_COLOR), (r.generated_pixels * 255).astype(np.uint8),
                     (r_off.generated_pixels * 255).astype(np.uint8), overlay(s.image, r.prob),
                     overlay(s.image, truth.astype(np.float32))]
            strips.append(np.concatenate([np.asarray(t, dtype=np.uint8)[..., :3] for t in tiles], 1))
        Image.fromarray(np.concatenate(strips, 0)).save(out / f"{sid}.png")
    (out / "rows.json").write_text(json.dumps(rows, indent=1))
    keys = ["iou_before", "iou_after", "steer_inside", "steer_outside", "match_same_label", "match_is_identity",
            "errors_in_band"]
    mean = {k: float(np.mean([r[k] for r in rows if r[k] is not None])) for k in keys}
    for proto in sorted({r["protocol"] for r in rows}):
        sel = [r for r in rows if r["protocol"] == proto]
        print(f"{proto:12s} n={len(sel):2d} " + " ".join(
            f"{k}={np.mean([r[k] for r in sel if r[k] is not None]):.3f}" for k in keys))
    print("all          " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
    (out / "summary.json").write_text(json.dumps({"config": config.to_dict(), "mean": mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
