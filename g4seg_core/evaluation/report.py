"""summary.json, summary.csv, grid.png and report.html (inline SVG charts, no plotting libs)."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.output_files import atomic_path, atomic_write_text, save_image
from .runner import BUCKETS, PAPER_TABLE_VII, dedupe

CSV_COLUMNS = ["method", "images", "samples",
               "miou_before", "miou_after", "miou_gain",
               "boundary_iou_before", "boundary_iou_after", "boundary_iou_gain",
               "mba_before", "mba_after", "mba_gain",
               "pixel_acc_before", "pixel_acc_after",
               "gain_0_40", "n_0_40", "gain_40_80", "n_40_80", "gain_80_100", "n_80_100",
               "seconds_per_image"]

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1",
          "#ff9da7", "#9c755f", "#bab0ac"]


def pred_path(out_dir, method: str, sid: str) -> Path:
    return Path(out_dir) / "pred" / method / f"{sid}.png"


def write_summary_json(out_dir, summary: dict) -> Path:
    path = Path(out_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=False, allow_nan=False) + "\n")
    return path


def _fmt(v, digits=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def csv_rows(summary: dict) -> List[Dict[str, str]]:
    rows = []
    for m, res in summary["methods"].items():
        t = summary.get("timing", {}).get(m, {})
        row = {"method": m, "images": res["num_images"], "samples": res["samples"]}
        for k in ("miou", "boundary_iou", "mba", "pixel_acc"):
            row[f"{k}_before"] = _fmt(res["before"][k], 4)
            row[f"{k}_after"] = _fmt(res["after"][k], 4)
            if f"{k}_gain" in CSV_COLUMNS:
                row[f"{k}_gain"] = _fmt(res["gain"][k], 4)
        for _, _, name in BUCKETS:
            key = name.replace("-", "_")
            row[f"gain_{key}"] = _fmt(res["buckets"][name]["gain"], 4)
            row[f"n_{key}"] = res["buckets"][name]["samples"]
        row["seconds_per_image"] = _fmt(t.get("seconds_per_image"), 4)
        rows.append(row)
    return rows


def write_summary_csv(out_dir, summary: dict) -> Path:
    path = Path(out_dir) / "summary.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(summary):
            w.writerow(row)
    return path


# ----------------------------------------------------------------------------- grid image

def _colorize(labels: np.ndarray, image: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    from ..files.palettes import voc_palette

    pal = voc_palette().astype(np.float32)
    col = pal[labels.astype(np.int64).clip(0, 255)]
    img = image.astype(np.float32)
    fg = (labels != 0)[..., None]
    out = np.where(fg, img * (1 - alpha) + col * alpha, img * 0.45)  # background dimmed
    return np.clip(out, 0, 255).astype(np.uint8)


def _thumb(arr: np.ndarray, height: int, nearest: bool) -> Image.Image:
    im = Image.fromarray(arr)
    w = max(1, round(im.width * height / im.height))
    w = min(w, 2 * height)
    return im.resize((w, height), Image.NEAREST if nearest else Image.BILINEAR)


def pick_examples(records: Sequence[dict], method: str) -> List[tuple]:
    """(tag, record) for the best / median / worst per-image mIoU gain of ``method``."""
    rs = [r for r in dedupe(records) if r["method"] == method
          and r["before"].get("miou") is not None and r["after"].get("miou") is not None]
    if not rs:
        return []
    rs.sort(key=lambda r: (r["after"]["miou"] - r["before"]["miou"], r["id"]))
    picks = [("best", rs[-1]), ("median", rs[len(rs) // 2]), ("worst", rs[0])]
    out, used = [], set()
    for tag, r in picks:
        if r["id"] in used:
            continue
        used.add(r["id"])
        out.append((tag, r))
    return out


def make_grid(out_dir, records: Sequence[dict], method: str, height: int = 160) -> Optional[Path]:
    """grid.png: rows best/median/worst, columns image | coarse | refined | GT."""
    from .datasets import load_labels, load_rgb

    rows = []
    for tag, r in pick_examples(records, method):
        coarse_p = pred_path(out_dir, "coarse", r["id"])
        refined_p = pred_path(out_dir, method, r["id"])
        try:
            image = load_rgb(Path(r["image"]))
            gt = load_labels(Path(r["gt"]))
            coarse = load_labels(coarse_p)
            refined = load_labels(refined_p)
        except Exception:  # files moved (another machine) or predictions not saved
            continue
        gain = 100.0 * (r["after"]["miou"] - r["before"]["miou"])
        cells = [_thumb(image, height, False), _thumb(_colorize(coarse, image), height, True),
                 _thumb(_colorize(refined, image), height, True), _thumb(_colorize(gt, image), height, True)]
        rows.append((f"{tag}: {r['id']}  mIoU {100 * r['before']['miou']:.1f} -> "
                     f"{100 * r['after']['miou']:.1f} ({gain:+.1f})", cells))
    if not rows:
        return None
    font = ImageFont.load_default()
    pad, text_h, head_h = 6, 16, 18
    col_w = [max(row[1][i].width for row in rows) for i in range(4)]
    width = sum(col_w) + pad * 5
    total_h = head_h + sum(text_h + height + pad for _ in rows) + pad
    canvas = Image.new("RGB", (width, total_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for i, title in enumerate(("image", "coarse", f"refined ({method})", "ground truth")):
        draw.text((x, 3), title, fill=(0, 0, 0), font=font)
        x += col_w[i] + pad
    y = head_h
    for caption, cells in rows:
        draw.text((pad, y + 2), caption, fill=(0, 0, 0), font=font)
        y += text_h
        x = pad
        for i, cell in enumerate(cells):
            canvas.paste(cell, (x, y))
            x += col_w[i] + pad
        y += height + pad
    path = Path(out_dir) / "grid.png"
    return save_image(canvas, path)


# ----------------------------------------------------------------------------- SVG charts

def svg_bar_chart(title: str, groups: Sequence[str], series: Sequence[tuple], unit: str = "",
                  width: int = 640, height: int = 260) -> str:
    """Grouped vertical bars. ``series``: [(name, [value or None per group]), ...]."""
    vals = [v for _, vs in series for v in vs if v is not None]
    if not vals:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    lo, hi = min(0.0, min(vals)), max(0.0, max(vals))
    if hi == lo:
        hi = lo + 1.0
    raw = (hi - lo) / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    lo = math.floor(lo / step) * step
    hi = math.ceil(hi * 1.02 / step) * step if hi > 0 else 0.0
    ticks = int(round((hi - lo) / step))
    left, right, top, bottom = 48, 12, 28, 46
    pw, ph = width - left - right, height - top - bottom

    def y_of(v):
        return top + ph * (hi - v) / (hi - lo)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
             f'{html.escape(title)}</text>']
    for k in range(ticks + 1):  # grid lines
        v = lo + step * k
        y = y_of(v)
        label = f"{v:.0f}" if step >= 1 else f"{v:.2g}"
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{label}{unit}</text>')
    y0 = y_of(0.0)
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y0:.1f}" y2="{y0:.1f}" stroke="#333"/>')
    ng, ns = max(1, len(groups)), max(1, len(series))
    gw = pw / ng
    bw = gw * 0.8 / ns
    for gi, g in enumerate(groups):
        gx = left + gi * gw + gw * 0.1
        for si, (name, vs) in enumerate(series):
            v = vs[gi]
            if v is None:
                continue
            y1, y2 = sorted((y_of(v), y0))
            x = gx + si * bw
            parts.append(f'<rect x="{x:.1f}" y="{y1:.1f}" width="{bw * 0.92:.1f}" height="{max(y2 - y1, 0.5):.1f}" '
                         f'fill="{COLORS[si % len(COLORS)]}"><title>{html.escape(name)} / {html.escape(g)}: '
                         f'{v:.2f}{unit}</title></rect>')
            ty = y1 - 3 if v >= 0 else y2 + 11
            parts.append(f'<text x="{x + bw * 0.46:.1f}" y="{ty:.1f}" text-anchor="middle" font-size="9">{v:.1f}</text>')
        parts.append(f'<text x="{left + gi * gw + gw / 2:.1f}" y="{top + ph + 14}" text-anchor="middle">'
                     f'{html.escape(g)}</text>')
    lx = left
    for si, (name, _) in enumerate(series):  # legend
        parts.append(f'<rect x="{lx}" y="{height - 16}" width="10" height="10" fill="{COLORS[si % len(COLORS)]}"/>')
        parts.append(f'<text x="{lx + 14}" y="{height - 7}">{html.escape(name)}</text>')
        lx += 24 + 7 * len(name)
    parts.append("</svg>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- HTML

def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def write_report_html(out_dir, summary: dict, grid: Optional[Path]) -> Path:
    methods = summary["methods"]
    run = summary.get("run", {})
    names = list(methods)
    esc = html.escape
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>G4Seg evaluation</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:20px auto;color:#222}",
           "table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:3px 8px;"
           "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}",
           ".warn{background:#fff3cd;border:1px solid #e0c46c;padding:8px}code{background:#f5f5f5}",
           "</style></head><body>", "<h1>G4Seg evaluation</h1>"]
    models = run.get("models")
    if models and "random" in str(models):
        out.append(f"<p class='warn'>Models: {esc(str(models))}. These numbers check the machinery, "
                   "not the method.</p>")
    ds = run.get("dataset", {})
    out.append("<p>Dataset <code>{}</code>, split {}, {} image(s); coarse masks: {}; classes refined: "
               "from {}.</p>".format(esc(str(ds.get("root"))), esc(str(ds.get("split"))),
                                     esc(str(ds.get("num_images"))),
                                     esc(str(ds.get("protocol") and f"synthetic '{ds.get('protocol')}' (seed {ds.get('seed')})"
                                             or ds.get("coarse"))),
                                     esc(str(ds.get("classes_from")))))
    out.append("<p>mIoU: one confusion matrix over the dataset (label 255 ignored; classes absent from "
               "both prediction and ground truth excluded). Boundary IoU: Cheng et al. 2021, band "
               f"{esc(str(run.get('boundary_ratio', 0.02)))} x diagonal, accumulated per class over the dataset. "
               "mBA: CascadePSP, mean over (image, foreground class) samples. All in percent.</p>")
    header = ["method", "images", "mIoU before", "mIoU after", "gain", "BIoU before", "BIoU after", "gain",
              "mBA before", "mBA after", "gain", "s / image"]
    rows = []
    for m in names:
        r = methods[m]
        t = summary.get("timing", {}).get(m, {})
        rows.append([m, r["num_images"], r["before"]["miou"], r["after"]["miou"], r["gain"]["miou"],
                     r["before"]["boundary_iou"], r["after"]["boundary_iou"], r["gain"]["boundary_iou"],
                     r["before"]["mba"], r["after"]["mba"], r["gain"]["mba"], t.get("seconds_per_image")])
    out.append("<h2>Summary</h2>" + _table(header, rows))
    out.append(svg_bar_chart("mIoU (%)", names, [
        ("before (coarse)", [methods[m]["before"]["miou"] for m in names]),
        ("after", [methods[m]["after"]["miou"] for m in names])]))
    out.append(svg_bar_chart("Gain over the coarse masks (points)", names, [
        ("mIoU", [methods[m]["gain"]["miou"] for m in names]),
        ("Boundary IoU", [methods[m]["gain"]["boundary_iou"] for m in names]),
        ("mBA", [methods[m]["gain"]["mba"] for m in names])]))

    # Table VII
    bnames = [b for _, _, b in BUCKETS]
    out.append("<h2>Gain by initial quality (paper Table VII)</h2><p>Samples: (image, foreground class in "
               "the ground truth) pairs, bucketed by the coarse mask's IoU for that class; gain = mean "
               "IoU after minus before, in points.</p>")
    header = ["method"] + [f"{b}: samples (ratio)" for b in bnames] + [f"{b}: gain" for b in bnames]
    rows = []
    for m in names:
        bk = methods[m]["buckets"]
        rows.append([m] + [f"{bk[b]['samples']} ({_fmt(100 * bk[b]['ratio'], 1) if bk[b]['ratio'] is not None else '-'}%)"
                           for b in bnames] + [bk[b]["gain"] for b in bnames])
    for ref, vals in PAPER_TABLE_VII.items():
        rows.append([f"paper: {ref}"] + ["" for _ in bnames] + [vals[b] for b in bnames])
    out.append(_table(header, rows))
    series = [(m, [methods[m]["buckets"][b]["gain"] for b in bnames]) for m in names if m != "none"]
    series.append(("paper G4Seg", [PAPER_TABLE_VII["g4seg"][b] for b in bnames]))
    out.append(svg_bar_chart("IoU gain by initial IoU bucket (points)", bnames, series))

    # per-class IoU
    class_names = list(next(iter(methods.values()))["before"]["per_class_iou"]) if methods else []
    header = ["class", "coarse"] + names
    rows = []
    for c in class_names:
        before = next(iter(methods.values()))["before"]["per_class_iou"][c]
        if before is None and all(methods[m]["after"]["per_class_iou"][c] is None for m in names):
            continue
        rows.append([c, before] + [methods[m]["after"]["per_class_iou"][c] for m in names])
    out.append("<h2>Per-class IoU (%)</h2>" + _table(header, rows))

    if grid is not None:
        out.append(f"<h2>Examples ({esc(str(summary.get('grid_method')))})</h2><p>Best, median and worst "
                   "per-image mIoU gain; columns: image | coarse | refined | ground truth.</p>"
                   f"<img src='{esc(grid.name)}' alt='example grid' style='max-width:100%'>")
    failures = summary.get("failures") or []
    if failures:
        out.append(f"<h2>Failed images ({len(failures)})</h2><p>Not in the totals above; fix them and rerun the "
                   "same command to evaluate just these.</p>" + _table(["id", "error"], [[f["id"], f["error"]]
                                                                         for f in failures]))
    out.append("<h2>Run</h2><pre>" + esc(json.dumps(run, indent=2)) + "</pre></body></html>")
    path = Path(out_dir) / "report.html"
    atomic_write_text(path, "\n".join(out))
    return path
