"""Evaluation runner: refine every class of every image, score, append to JSONL.

One JSON line per (image, method), written and flushed as soon as it is done, so an
interrupted run loses at most the method in flight; a rerun skips every (id, method)
already present in any ``results*.jsonl`` of the output folder. Totals are always
recomputed from the lines (deduplicated by (id, method), order-independent sums), so a
resumed run, a sharded run merged afterwards and one uninterrupted process give the same
summary.

A line holds, for the coarse input ("before") and the method's output ("after"):
- ``cm``: the image's confusion matrix as sparse [gt, pred, count] triples;
- ``biou``: per class {c: [intersection, union]} of the Boundary IoU bands (all classes
  present in gt or prediction, background included; ignore pixels excluded);
- ``iou`` / ``mba``: per foreground class present in the ground truth, the class IoU
  and mBA of this image (the "samples" of Table VII);
plus ``miou`` (the image's own mIoU, used to pick grid examples) and ``time_s``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import G4SegError
from .metrics import ConfusionMatrix, boundary_band, boundary_dilation, iou, mba
from ..files.output_files import os_error_message

BUCKETS = ((0.0, 40.0, "0-40"), (40.0, 80.0, "40-80"), (80.0, 100.0001, "80-100"))
# Table VII (VOC, CLIP-ES seeds): gain in IoU points per initial-IoU bucket.
PAPER_TABLE_VII = {"g4seg": {"0-40": 0.2, "40-80": 1.9, "80-100": 1.1},
                   "controlnet": {"0-40": 0.75, "40-80": 4.2, "80-100": 4.1},
                   "cascadepsp": {"0-40": 0.2, "40-80": 1.5, "80-100": 1.0}}


# ----------------------------------------------------------------------------- scoring

def fuse(probs: Mapping[int, np.ndarray], shape, bg_power: float) -> np.ndarray:
    if not probs:
        return np.zeros(shape, dtype=np.uint8)
    from ..method.label_maps import fuse_multiclass

    return np.asarray(fuse_multiclass(dict(probs), bg_power=bg_power))


def score(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int,
          boundary_ratio: float = 0.02) -> dict:
    """All per-image statistics of one label map against the ground truth."""
    valid = gt != ignore_index
    cm = ConfusionMatrix(num_classes, ignore_index).update(pred, gt)
    d = boundary_dilation(gt.shape, boundary_ratio)
    gt_classes = np.unique(gt[valid]).tolist()
    classes = sorted(set(gt_classes) | set(np.unique(pred[valid]).tolist()))
    biou = {}
    for c in classes:
        bp = boundary_band(pred == c, dilation=d) & valid
        bg = boundary_band(gt == c, dilation=d) & valid
        biou[str(int(c))] = [int(np.count_nonzero(bp & bg)), int(np.count_nonzero(bp | bg))]
    ious, mbas = {}, {}
    for c in gt_classes:  # np.unique: already sorted
        if c == 0:
            continue
        ious[str(int(c))] = iou(pred == c, gt == c, valid=valid)
        m = mba(pred == c, gt == c, valid=valid)
        mbas[str(int(c))] = None if math.isnan(m) else m
    image_miou = cm.miou()
    return {"cm": cm.sparse(), "miou": None if math.isnan(image_miou) else image_miou,
            "biou": biou, "iou": ious, "mba": mbas}


def evaluate_image(sample, refiners: Mapping[str, Callable], num_classes: int, ignore_index: int,
                   bg_power: float, boundary_ratio: float, before: dict):
    """Yield (method, record, label_map) for each refiner; ``before`` is the coarse map's score()."""
    hw = sample.gt.shape
    for name, refiner in refiners.items():
        t0 = time.perf_counter()
        classes = sorted(sample.coarse)
        names = [sample.labels[c] for c in classes]
        if len(set(names)) != len(names):
            raise G4SegError(f"{sample.id}: two classes share a name ({', '.join(names)}): give every class its own "
                             "name (--class-names)")
        out = refiner(sample.image, {n: sample.coarse[c] for n, c in zip(names, classes)})
        refined = {}
        for c, n in zip(classes, names):
            refined[c] = np.clip(np.asarray(out[n], dtype=np.float32), 0.0, 1.0)
            if refined[c].shape != hw:
                raise G4SegError(f"refiner {name} returned {refined[c].shape}, expected {hw}")
        label = fuse(refined, hw, bg_power)
        elapsed = time.perf_counter() - t0
        after = score(label, sample.gt, num_classes, ignore_index, boundary_ratio)
        record = {"id": sample.id, "method": name, "shape": list(hw),
                  "classes": sorted(int(c) for c in sample.coarse),
                  "image": sample.image_path, "gt": sample.gt_path,
                  "before": before, "after": after, "time_s": round(elapsed, 4)}
        yield name, record, label


# ----------------------------------------------------------------------------- files

def results_files(out_dir) -> List[Path]:
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir()
                  if p.name.startswith("results") and p.name.endswith(".jsonl"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _side_problem(side, num_classes: Optional[int]) -> Optional[str]:
    if not isinstance(side, dict):
        return "is not an object"
    for key in ("cm", "biou", "iou", "mba"):
        if key not in side:
            return f"lacks {key!r}"
    cm = side["cm"]
    if not isinstance(cm, list) or not all(
            isinstance(e, list) and len(e) == 3 and all(_is_int(v) and v >= 0 for v in e) for e in cm):
        return "'cm' is not a list of [gt, pred, count] integer triples"
    if num_classes is not None and any(g >= num_classes or q >= num_classes for g, q, _ in cm):
        return f"'cm' names a class >= {num_classes} classes"
    biou = side["biou"]
    if not isinstance(biou, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v) for v in biou.values()):
        return "'biou' is not {class: [intersection, union]} of integers"
    if not isinstance(side["iou"], dict) or not all(_is_number(v) for v in side["iou"].values()):
        return "'iou' is not {class: number}"
    if not isinstance(side["mba"], dict) or not all(v is None or _is_number(v) for v in side["mba"].values()):
        return "'mba' is not {class: number or null}"
    if not (side.get("miou") is None or _is_number(side.get("miou"))):
        return "'miou' is not a number or null"
    return None


def record_problem(rec, num_classes: Optional[int] = None,
                   methods: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why a parsed results line cannot be used (None if it can): the schema evaluate_image writes."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key in ("id", "method", "before", "after"):
        if key not in rec:
            return f"missing key {key!r}"
    if not isinstance(rec["id"], str) or not rec["id"]:
        return f"id {rec['id']!r} is not a non-empty string"
    if not isinstance(rec["method"], str) or not rec["method"]:
        return f"method {rec['method']!r} is not a non-empty string"
    if methods is not None and rec["method"] not in methods:
        return f"method {rec['method']!r} is not one of this run's methods ({', '.join(methods)})"
    if "time_s" in rec and not _is_number(rec["time_s"]):
        return "'time_s' is not a number"
    for side in ("before", "after"):
        problem = _side_problem(rec[side], num_classes)
        if problem:
            return f"{side!r} {problem}"
    return None


@dataclass
class DamagedLine:
    path: Path
    line: int  # 1-based
    reason: str
    raw: bytes


def load_records(paths: Iterable[Path], num_classes: Optional[int] = None,
                 methods: Optional[Sequence[str]] = None) -> Tuple[List[dict], List[DamagedLine]]:
    """(records, damaged lines) of the given JSONL files.

    A line cut by an interruption (no newline yet) is neither: the writer cuts it off. Every
    other line that is not valid UTF-8, not JSON, or not a record of this run's schema is a
    damaged line: never used, so its (id, method) counts as not done and is redone.
    """
    records: List[dict] = []
    damaged: List[DamagedLine] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise G4SegError(f"cannot read results file {os_error_message(exc)}") from None
        lines = data.split(b"\n")
        for number, raw in enumerate(lines[:-1], start=1):  # the last piece has no newline
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reason = "not valid UTF-8"
            except ValueError as exc:
                reason = f"not JSON ({exc})"
            else:
                reason = record_problem(rec, num_classes, methods)
                if reason is None:
                    records.append(rec)
                    continue
            damaged.append(DamagedLine(Path(path), number, reason, raw))
    return records, damaged


def warn_damaged(damaged: Sequence[DamagedLine], out=None) -> None:
    """One warning per file: how many lines were dropped and why (the first few)."""
    out = sys.stderr if out is None else out
    by_file: Dict[Path, List[DamagedLine]] = {}
    for d in damaged:
        by_file.setdefault(d.path, []).append(d)
    for path, items in by_file.items():
        shown = "; ".join(f"line {d.line}: {d.reason}" for d in items[:3])
        more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
        print(f"warning: {path}: ignoring {len(items)} damaged line(s) ({shown}{more}); "
              f"their images are evaluated again", file=out)


def dedupe(records: Iterable[dict]) -> List[dict]:
    """One record per (id, method) (the first seen), sorted by (id, method)."""
    seen: Dict[Tuple[str, str], dict] = {}
    for rec in records:
        key = (str(rec["id"]), str(rec["method"]))
        seen.setdefault(key, rec)
    return [seen[k] for k in sorted(seen)]


class JsonlWriter:
    """Append-only JSONL; a partial last line left by a crash is cut off first."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                keep = data.rfind(b"\n") + 1
                with open(self.path, "r+b") as fh:
                    fh.truncate(keep)
        self.fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        self.fh.flush()
        try:
            os.fsync(self.fh.fileno())
        except OSError:
            pass

    def close(self) -> None:
        self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- totals

def _bucket(iou_before_pct: float) -> str:
    for lo, hi, name in BUCKETS:
        if lo <= iou_before_pct < hi:
            return name
    return BUCKETS[-1][2]


def _fmean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return math.fsum(values) / len(values) if values else None


def _pct(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else 100.0 * x


def _boundary_miou(sums: Dict[str, List[int]], num_classes: int) -> Tuple[Optional[float], List[Optional[float]]]:
    per = []
    for c in range(num_classes):
        inter, union = sums.get(str(c), (0, 0))
        per.append(inter / union if union else None)
    return _fmean(per), per


def summarize(records: Iterable[dict], num_classes: int, ignore_index: int = 255,
              class_names: Optional[Sequence[str]] = None,
              methods: Optional[Sequence[str]] = None) -> dict:
    """Dataset totals per method, recomputed from the JSONL records (percent units)."""
    recs = dedupe(records)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    by_method: Dict[str, List[dict]] = {}
    for rec in recs:
        by_method.setdefault(rec["method"], []).append(rec)
    order = [m for m in (methods or []) if m in by_method] + sorted(m for m in by_method if m not in (methods or []))
    out = {}
    for m in order:
        rs = by_method[m]
        res = {"num_images": len(rs)}
        for side in ("before", "after"):
            cm = ConfusionMatrix(num_classes, ignore_index)
            bsum: Dict[str, List[int]] = {}
            mbas = []
            for r in rs:
                cm.add_entries(r[side]["cm"])
                for c, (i, u) in r[side]["biou"].items():
                    acc = bsum.setdefault(c, [0, 0])
                    acc[0] += int(i)
                    acc[1] += int(u)
                mbas.extend(v for v in r[side]["mba"].values() if v is not None)
            per = cm.per_class_iou()
            biou, bper = _boundary_miou(bsum, num_classes)
            res[side] = {
                "miou": _pct(cm.miou()),
                "pixel_acc": _pct(cm.pixel_accuracy()),
                "boundary_iou": _pct(biou),
                "mba": _pct(_fmean(mbas)),
                "per_class_iou": {names[c]: (None if math.isnan(per[c]) else 100.0 * per[c])
                                  for c in range(num_classes)},
                "per_class_boundary_iou": {names[c]: _pct(bper[c]) for c in range(num_classes)},
            }
        res["gain"] = {}
        for k in ("miou", "pixel_acc", "boundary_iou", "mba"):
            b, a = res["before"][k], res["after"][k]
            res["gain"][k] = None if a is None or b is None else a - b
        # Table VII: per (image, foreground class in gt) samples bucketed by initial IoU.
        groups: Dict[str, List[Tuple[float, float]]] = {name: [] for _, _, name in BUCKETS}
        for r in rs:
            for c, before in r["before"]["iou"].items():
                after = r["after"]["iou"].get(c)
                if after is None:
                    continue
                groups[_bucket(100.0 * before)].append((100.0 * before, 100.0 * after))
        total = sum(len(v) for v in groups.values())
        res["buckets"] = {}
        for _, _, name in BUCKETS:
            pairs = groups[name]
            res["buckets"][name] = {
                "samples": len(pairs),
                "ratio": (len(pairs) / total) if total else None,
                "iou_before": _fmean([b for b, _ in pairs]),
                "iou_after": _fmean([a for _, a in pairs]),
                "gain": _fmean([a - b for b, a in pairs]),
            }
        res["samples"] = total
        out[m] = res
    return out


def timing(records: Iterable[dict]) -> dict:
    recs = dedupe(records)
    out: Dict[str, dict] = {}
    for r in recs:
        t = out.setdefault(r["method"], {"images": 0, "seconds": 0.0})
        t["images"] += 1
        t["seconds"] += float(r.get("time_s", 0.0))
    for t in out.values():
        t["seconds_per_image"] = t["seconds"] / t["images"] if t["images"] else None
    return out
