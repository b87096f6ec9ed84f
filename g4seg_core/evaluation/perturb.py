"""Synthetic coarse masks made from ground truth (SPEC.md "Metrics").

``make_coarse(gt_bool, protocol, seed) -> float32 [H, W]`` in [0, 1]. Protocols:

- ``perturb-<iou>`` (e.g. ``perturb-0.9``, ``perturb-0.8``, ``perturb-0.7``): a
  CascadePSP/SegRefiner-style degradation, re-implemented here without OpenCV:
    1. contour simplification: the mask is area-downsampled by a random factor (with a
       random sub-block offset), bilinearly upsampled and thresholded at 0.5, which
       drops the detail of the contour the way redrawing a polygon through a subsample
       of the contour points does (skipped when it alone would fall below the target);
    2. random local dilation / erosion: a disk centred on a random contour pixel is set
       to foreground or background (50/50), repeated until IoU(coarse, gt) < target.
       The disk radius shrinks with the remaining IoU gap (at most ~3 % of the object
       area per step), so the result lands just under the target (typically within
       0.02).
  Output is binary (0/1). An empty ground truth gives an empty mask. ``valid=`` restricts
  the IoU to non-ignored pixels (``g4seg eval`` passes ``labels != 255``), so the target
  holds for the IoU the evaluation will measure.
- ``dilate-<px>`` / ``erode-<px>``: binary dilation / erosion by a Euclidean disk of
  radius px (``dilate-5``, ``dilate-10``, ``dilate-20``; the image edge does not erode).
- ``lowres-<k>``: the ground truth area-downsampled k times (``lowres-8``,
  ``lowres-16``) and bilinearly upsampled back: a soft, CAM-like probability map.
- ``gt``: the ground truth itself (sanity check: every metric is perfect).

Every protocol is deterministic for a given ``seed``; use ``derive_seed(seed, image_id,
class_index)`` to give every (image, class) its own stream, stable across processes.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import G4SegError
from .metrics import as_bool_mask, dilate_disk, erode_disk

__all__ = ["make_coarse", "parse_protocol", "derive_seed", "perturb_to_iou",
           "simplify_contour", "lowres", "PROTOCOL_EXAMPLES"]

PROTOCOL_EXAMPLES = ("perturb-0.9", "perturb-0.8", "perturb-0.7", "dilate-5", "dilate-10",
                     "dilate-20", "erode-5", "erode-10", "erode-20", "lowres-8", "lowres-16", "gt")

_PATTERN = re.compile(r"^(perturb|dilate|erode|lowres)-([0-9]*\.?[0-9]+)$")


def parse_protocol(protocol: str) -> Tuple[str, float]:
    """'perturb-0.8' -> ('perturb', 0.8); raises G4SegError naming valid examples."""
    name = str(protocol).strip().lower()
    if name in ("gt", "identity"):
        return "gt", 0.0
    m = _PATTERN.match(name)
    hint = f"use one of {', '.join(PROTOCOL_EXAMPLES)}"
    if not m:
        raise G4SegError(f"unknown coarse-mask protocol {protocol!r}: {hint}")
    kind, value = m.group(1), float(m.group(2))
    if kind == "perturb" and not 0.0 < value < 1.0:
        raise G4SegError(f"{protocol!r}: the IoU target must be between 0 and 1; {hint}")
    if kind in ("dilate", "erode", "lowres"):
        if value != int(value) or value < 1:
            raise G4SegError(f"{protocol!r}: use a whole number of pixels / a factor >= 1; {hint}")
        value = int(value)
    return kind, value


def derive_seed(seed: int, *parts) -> int:
    """A 32-bit seed from a base seed and any labels (stable across runs and processes)."""
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    return zlib.crc32(text.encode("utf-8")) & 0xFFFFFFFF


def lowres(gt: np.ndarray, factor: int) -> np.ndarray:
    """Area-downsample by ``factor`` (ceil size) and bilinearly upsample: float32 [H, W]."""
    g = torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float32))[None, None]
    h, w = gt.shape
    small = F.adaptive_avg_pool2d(g, (max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor))))
    up = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return up[0, 0].clamp_(0, 1).numpy().astype(np.float32)


def simplify_contour(gt: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Contour simplification: low-pass at a random grid offset, threshold 0.5."""
    h, w = gt.shape
    if factor <= 1.0:
        return gt.copy()
    oy, ox = (int(v) for v in rng.integers(0, max(1, int(factor)), size=2))
    padded = np.zeros((h + oy, w + ox), dtype=np.float32)
    padded[oy:, ox:] = gt
    g = torch.from_numpy(padded)[None, None]
    small = F.adaptive_avg_pool2d(g, (max(1, round((h + oy) / factor)), max(1, round((w + ox) / factor))))
    up = F.interpolate(small, size=(h + oy, w + ox), mode="bilinear", align_corners=False)
    return up[0, 0, oy:, ox:].numpy() >= 0.5


def _contour_pixels(mask: np.ndarray) -> np.ndarray:
    """Flat indices of pixels whose 3x3 neighbourhood holds both labels."""
    pad = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    any_fg = np.zeros((h, w), dtype=bool)
    all_fg = np.ones((h, w), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            win = pad[dy:dy + h, dx:dx + w]
            any_fg |= win
            all_fg &= win
    return np.flatnonzero(any_fg & ~all_fg)


def perturb_to_iou(gt, target: float, seed: int = 0, max_steps: int = 20000,
                   simplify: bool = True, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Binary coarse mask with IoU(coarse, gt) just below ``target`` (see module doc).

    ``valid``: pixels the IoU is measured on (e.g. ``labels != 255``), so the target
    holds for the metric that will be computed; default all.
    """
    g = as_bool_mask(gt, "ground-truth mask")
    rng = np.random.default_rng(seed)
    v = np.ones(g.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if v.shape != g.shape:
        raise G4SegError(f"valid mask {v.shape} and ground truth {g.shape} differ in size")
    area = int(np.count_nonzero(g & v))
    if area == 0:
        return np.zeros(g.shape, dtype=bool)
    h, w = g.shape
    cur = g.copy()
    if simplify:
        factor = float(rng.uniform(0.04, 0.10)) * math.sqrt(area)
        cand = simplify_contour(g, factor, rng)
        inter = int(np.count_nonzero(cand & g & v))
        union = int(np.count_nonzero((cand | g) & v))
        if union and inter / union >= target + 0.02:
            cur = cand
    inter = int(np.count_nonzero(cur & g & v))
    union = int(np.count_nonzero((cur | g) & v))
    r_cap = max(1.0, math.sqrt(2 * 0.03 * area / math.pi))
    for _ in range(max_steps):
        value = inter / union if union else 1.0
        if value < target:
            break
        gap = value - target + 0.004
        r_want = math.sqrt(2 * gap * area / math.pi)
        radius = max(1, int(round(min(r_cap, r_want) * rng.uniform(0.4, 1.0))))
        contour = _contour_pixels(cur)
        if contour.size:
            idx = int(contour[rng.integers(contour.size)])
        else:  # full or empty mask: start anywhere
            idx = int(rng.integers(h * w))
        cy, cx = divmod(idx, w)
        grow = bool(rng.random() < 0.5)
        y0, y1 = max(0, cy - radius), min(h, cy + radius + 1)
        x0, x1 = max(0, cx - radius), min(w, cx + radius + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius * radius
        win = cur[y0:y1, x0:x1]
        gwin = g[y0:y1, x0:x1]
        vwin = v[y0:y1, x0:x1]
        before_i = int(np.count_nonzero(win & gwin & vwin))
        before_u = int(np.count_nonzero((win | gwin) & vwin))
        new = win | disk if grow else win & ~disk
        inter += int(np.count_nonzero(new & gwin & vwin)) - before_i
        union += int(np.count_nonzero((new | gwin) & vwin)) - before_u
        cur[y0:y1, x0:x1] = new
    return cur


def make_coarse(gt, protocol: str, seed: int = 0, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """A synthetic coarse probability map (float32 [H, W] in [0, 1]) from a GT mask.

    ``valid`` (perturb only): the pixels the IoU target is measured on (not ignored).
    """
    kind, value = parse_protocol(protocol)
    g = as_bool_mask(gt, "ground-truth mask")
    if kind == "gt":
        out = g
    elif kind == "perturb":
        out = perturb_to_iou(g, float(value), seed=seed, valid=valid)
    elif kind == "dilate":
        out = dilate_disk(g, int(value))
    elif kind == "erode":
        out = erode_disk(g, int(value), outside=True)
    else:  # lowres
        return lowres(g, int(value))
    return out.astype(np.float32)
