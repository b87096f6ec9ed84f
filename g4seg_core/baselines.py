"""Mask refiners under one interface, for comparisons (paper Table XI) and ``g4seg eval``.

``Refiner = Callable[[image, prob, label], prob]``: ``image`` uint8 ``[H, W, 3]`` RGB,
``prob`` float32 ``[H, W]`` foreground probability of one class, ``label`` the class
name; returns the refined float32 ``[H, W]`` probability. Multi-class maps are refined
one class at a time against everything else and fused afterwards (masks.fuse_multiclass).

Names understood by ``make_refiner``:
- ``none``        identity (the coarse input; the "before" numbers)
- ``densecrf``    fully-connected CRF (pydensecrf2 extra), 2 labels per class
- ``morphology``  grey-level opening then closing with a disk (removes specks, fills holes)
- ``guided``      He et al. guided filter with the colour image as guide (box filters)
- ``g4seg``       ``G4SegPipeline.refine(image, prob, label, config).prob``
- any ``a+b``     chain, e.g. ``g4seg+densecrf`` (the paper's best combination)
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from .errors import G4SegError
from .metrics import grey_dilate_disk, grey_erode_disk

__all__ = ["Refiner", "REFINER_NAMES", "make_refiner", "compose", "identity_refiner",
           "densecrf_refiner", "morphology_refiner", "guided_refiner", "g4seg_refiner",
           "guided_filter", "box_filter"]

Refiner = Callable[[np.ndarray, np.ndarray, str], np.ndarray]

REFINER_NAMES = ("none", "densecrf", "morphology", "guided", "g4seg", "g4seg+densecrf")
_BASE = ("none", "densecrf", "morphology", "guided", "g4seg")


def _prob(prob) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2:
        raise G4SegError(f"a refiner takes one probability map [H, W], got shape {p.shape}")
    return p


def identity_refiner() -> Refiner:
    def refine(image, prob, label):
        return _prob(prob).copy()
    refine.__name__ = "none"
    return refine


def densecrf_refiner(confidence="auto", **crf_kwargs) -> Refiner:
    """DenseCRF per class. ``confidence='auto'``: 0.8 for hard 0/1 inputs, none for soft."""
    from .densecrf import dense_crf

    def refine(image, prob, label):
        p = _prob(prob)
        conf = confidence
        if conf == "auto":
            conf = 0.8 if np.all((p == 0) | (p == 1)) else None
        return dense_crf(image, p, confidence=conf, **crf_kwargs)
    refine.__name__ = "densecrf"
    return refine


def morphology_refiner(radius: Optional[int] = None, radius_ratio: float = 0.005) -> Refiner:
    """Opening then closing (grey level, disk). radius None: ratio x image diagonal, >= 1."""
    def refine(image, prob, label):
        p = _prob(prob)
        r = radius if radius is not None else max(1, int(round(radius_ratio * math.hypot(*p.shape))))
        opened = grey_dilate_disk(grey_erode_disk(p, r), r)
        return grey_erode_disk(grey_dilate_disk(opened, r), r)
    refine.__name__ = "morphology"
    return refine


def box_filter(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window clipped to the image, for [H, W] or [H, W, C] (float64)."""
    x = np.asarray(x, dtype=np.float64)
    squeeze = x.ndim == 2
    if squeeze:
        x = x[..., None]
    h, w = x.shape[:2]
    ii = np.zeros((h + 1, w + 1, x.shape[2]), dtype=np.float64)
    np.cumsum(np.cumsum(x, axis=0), axis=1, out=ii[1:, 1:])
    y0 = np.clip(np.arange(h) - r, 0, h)
    y1 = np.clip(np.arange(h) + r + 1, 0, h)
    x0 = np.clip(np.arange(w) - r, 0, w)
    x1 = np.clip(np.arange(w) + r + 1, 0, w)
    s = ii[y1][:, x1] - ii[y0][:, x1] - ii[y1][:, x0] + ii[y0][:, x0]
    n = ((y1 - y0)[:, None] * (x1 - x0)[None, :]).astype(np.float64)
    out = s / n[..., None]
    return out[..., 0] if squeeze else out


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """He et al. (2010/2013) guided filter with an RGB guide in [0, 1] ([H, W, 3])."""
    I = np.asarray(guide, dtype=np.float64)
    p = np.asarray(src, dtype=np.float64)
    h, w = p.shape
    mean_I = box_filter(I, radius)                       # [H, W, 3]
    mean_p = box_filter(p, radius)                       # [H, W]
    mean_Ip = box_filter(I * p[..., None], radius)       # [H, W, 3]
    cov_Ip = mean_Ip - mean_I * mean_p[..., None]
    # Covariance of the guide, 3x3 per pixel.
    outer = (I[..., :, None] * I[..., None, :]).reshape(h, w, 9)
    sigma = box_filter(outer, radius).reshape(h, w, 3, 3)
    sigma -= mean_I[..., :, None] * mean_I[..., None, :]
    sigma += eps * np.eye(3)
    a = np.linalg.solve(sigma, cov_Ip[..., None])[..., 0]   # [H, W, 3]
    b = mean_p - np.einsum("hwc,hwc->hw", a, mean_I)
    mean_a = box_filter(a, radius)
    mean_b = box_filter(b, radius)
    return np.einsum("hwc,hwc->hw", mean_a, I) + mean_b


def guided_refiner(radius: Optional[int] = None, radius_ratio: float = 0.015,
                   eps: float = 1e-2) -> Refiner:
    """Guided filter of the probability map, guide = image; radius None: ratio x diagonal."""
    def refine(image, prob, label):
        p = _prob(prob)
        img = np.asarray(image)
        if img.shape[:2] != p.shape:
            raise G4SegError(f"image {img.shape[:2]} and mask {p.shape} differ in size")
        r = radius if radius is not None else max(1, int(round(radius_ratio * math.hypot(*p.shape))))
        guide = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 else 1.0)
        return np.clip(guided_filter(guide, p, r, eps), 0.0, 1.0).astype(np.float32)
    refine.__name__ = "guided"
    return refine


def g4seg_refiner(pipeline, config=None) -> Refiner:
    """G4Seg itself: ``pipeline.refine(image, prob, label, config).prob``."""
    if pipeline is None:
        raise G4SegError("the g4seg refiner needs a G4SegPipeline: give --checkpoint (or --tiny for a smoke test)")

    def refine(image, prob, label):
        result = pipeline.refine(image, _prob(prob), label, config)
        return np.asarray(result.prob, dtype=np.float32)
    refine.__name__ = "g4seg"
    return refine


def compose(*refiners: Refiner) -> Refiner:
    """Apply refiners left to right."""
    def refine(image, prob, label):
        out = _prob(prob)
        for r in refiners:
            out = _prob(r(image, out, label))
        return out
    refine.__name__ = "+".join(getattr(r, "__name__", "?") for r in refiners)
    return refine


def make_refiner(name: str, pipeline=None, config=None,
                 options: Optional[Mapping[str, Dict]] = None) -> Refiner:
    """Build a refiner by name (see module doc); ``options[base_name]`` are its kwargs."""
    options = dict(options or {})
    parts = [p.strip().lower() for p in str(name).split("+")]
    built = []
    for part in parts:
        kw = dict(options.get(part, {}))
        if part == "none":
            built.append(identity_refiner())
        elif part == "densecrf":
            built.append(densecrf_refiner(**kw))
        elif part == "morphology":
            built.append(morphology_refiner(**kw))
        elif part == "guided":
            built.append(guided_refiner(**kw))
        elif part == "g4seg":
            built.append(g4seg_refiner(pipeline, config))
        else:
            raise G4SegError(f"unknown refiner {part!r} in {name!r}: choose from {', '.join(_BASE)} "
                             "or chain them with '+', e.g. g4seg+densecrf")
    if len(built) == 1:
        return built[0]
    return compose(*built)


def needs_pipeline(name: str) -> bool:
    return "g4seg" in [p.strip().lower() for p in str(name).split("+")]


def needs_crf(name: str) -> bool:
    return "densecrf" in [p.strip().lower() for p in str(name).split("+")]
