"""Mask refiners under one interface, for comparisons (paper Table XI) and ``g4seg eval``.

``Refiner = Callable[[image, {class name: prob}], {class name: prob}]``: ``image`` uint8
``[H, W, 3]`` RGB, each ``prob`` float32 ``[H, W]``, the foreground probability of one class of
that image; returns every class's refined float32 ``[H, W]`` probability. The classic filters
work one class at a time against everything else; ``g4seg`` is
``multiclass.refine_classes`` (its rule picks the classes to refine, as in ``g4seg segment
--refine`` and G4SegRefineClasses). The evaluation fuses the maps afterwards
(label_maps.fuse_multiclass).

Names understood by ``make_refiner``:
- ``none``        identity (the coarse input; the "before" numbers)
- ``densecrf``    fully-connected CRF (pydensecrf2 extra), 2 labels per class
- ``morphology``  grey-level opening then closing with a disk (removes specks, fills holes)
- ``guided``      He et al. guided filter with the colour image as guide (box filters)
- ``g4seg``       ``pipeline.refine_classes(image, probs, config).probs`` (multiclass.refine_classes)
- any ``a+b``     chain, e.g. ``g4seg+densecrf`` (the paper's best combination)
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from ..errors import G4SegError
from .metrics import grey_dilate_disk, grey_erode_disk

__all__ = ["Refiner", "make_refiner", "compose", "per_class", "identity_refiner",
           "densecrf_refiner", "morphology_refiner", "guided_refiner", "g4seg_refiner",
           "guided_filter", "box_filter", "BASE_REFINERS", "needs_pipeline", "needs_crf"]

Refiner = Callable[[np.ndarray, Mapping[str, np.ndarray]], Dict[str, np.ndarray]]

BASE_REFINERS = ("none", "densecrf", "morphology", "guided", "g4seg")


def _prob(prob) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2:
        raise G4SegError(f"a refiner takes one probability map [H, W], got shape {p.shape}")
    return p


def per_class(refine_one: Callable[[np.ndarray, np.ndarray], np.ndarray], name: str) -> Refiner:
    """A Refiner that applies ``refine_one(image, prob)`` to each class map on its own."""
    def refine(image, probs):
        return {label: refine_one(image, _prob(p)) for label, p in probs.items()}
    refine.__name__ = name
    return refine


def identity_refiner() -> Refiner:
    return per_class(lambda image, p: p.copy(), "none")


def densecrf_refiner(confidence="auto", **crf_kwargs) -> Refiner:
    """DenseCRF per class. ``confidence='auto'``: 0.8 for hard 0/1 inputs, none for soft."""
    from .densecrf import dense_crf

    def refine(image, p):
        conf = confidence
        if conf == "auto":
            conf = 0.8 if np.all((p == 0) | (p == 1)) else None
        return dense_crf(image, p, confidence=conf, **crf_kwargs)
    return per_class(refine, "densecrf")


def morphology_refiner(radius: Optional[int] = None, radius_ratio: float = 0.005) -> Refiner:
    """Opening then closing (grey level, disk). radius None: ratio x image diagonal, >= 1."""
    def refine(image, p):
        r = radius if radius is not None else max(1, int(round(radius_ratio * math.hypot(*p.shape))))
        opened = grey_dilate_disk(grey_erode_disk(p, r), r)
        return grey_erode_disk(grey_dilate_disk(opened, r), r)
    return per_class(refine, "morphology")


def box_filter(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window clipped to the image, for [H, W] or [H, W, C] (float64).

    Separable running sums (cumulative sums along each axis), O(HW) for any radius.
    """
    out = np.asarray(x, dtype=np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        shape = list(out.shape)
        shape[axis] = n + 1
        cs = np.zeros(shape, dtype=np.float64)
        idx = [slice(None)] * out.ndim
        idx[axis] = slice(1, None)
        np.cumsum(out, axis=axis, out=cs[tuple(idx)])
        lo = np.clip(np.arange(n) - r, 0, n)
        hi = np.clip(np.arange(n) + r + 1, 0, n)
        count = (hi - lo).astype(np.float64)
        count_shape = [1] * out.ndim
        count_shape[axis] = n
        out = (np.take(cs, hi, axis=axis) - np.take(cs, lo, axis=axis)) / count.reshape(count_shape)
    return out


def _solve3(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Solve m x = v for a field of 3x3 systems (Cramer's rule; m is SPD here)."""
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    g, h, i = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    A, B, C = e * i - f * h, f * g - d * i, d * h - e * g
    D, E, F = c * h - b * i, a * i - c * g, b * g - a * h
    G, H, I = b * f - c * e, c * d - a * f, a * e - b * d
    det = a * A + b * B + c * C
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack([A * x + D * y + G * z, B * x + E * y + H * z, C * x + F * y + I * z], -1) / det[..., None]


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
    a = _solve3(sigma, cov_Ip)                               # [H, W, 3]
    b = mean_p - np.einsum("hwc,hwc->hw", a, mean_I)
    mean_a = box_filter(a, radius)
    mean_b = box_filter(b, radius)
    return np.einsum("hwc,hwc->hw", mean_a, I) + mean_b


def guided_refiner(radius: Optional[int] = None, radius_ratio: float = 0.015,
                   eps: float = 1e-2) -> Refiner:
    """Guided filter of the probability map, guide = image; radius None: ratio x diagonal."""
    def refine(image, p):
        img = np.asarray(image)
        if img.shape[:2] != p.shape:
            raise G4SegError(f"image {img.shape[:2]} and mask {p.shape} differ in size")
        r = radius if radius is not None else max(1, int(round(radius_ratio * math.hypot(*p.shape))))
        guide = img.astype(np.float64) / (255.0 if img.dtype == np.uint8 else 1.0)
        return np.clip(guided_filter(guide, p, r, eps), 0.0, 1.0).astype(np.float32)
    return per_class(refine, "guided")


def g4seg_refiner(pipeline, config=None) -> Refiner:
    """G4Seg itself: ``pipeline.refine_classes(image, probs, config).probs`` (multiclass.refine_classes).

    A repeated (image, class maps) returns the cached result, so ``g4seg`` and ``g4seg+densecrf``
    in one evaluation run G4Seg once per image.
    """
    if pipeline is None:
        raise G4SegError("the g4seg refiner needs a G4SegPipeline: give --checkpoint (or --selfcheck for a smoke test)")
    import zlib

    state = {"image": None, "results": {}}

    def refine(image, probs):
        probs = {label: _prob(p) for label, p in probs.items()}
        if state["image"] is not image:  # a new image: drop the cache
            state.update(image=image, results={})
        key = tuple((label, p.shape, zlib.crc32(np.ascontiguousarray(p).tobytes())) for label, p in probs.items())
        if key not in state["results"]:
            state["results"][key] = pipeline.refine_classes(image, probs, config).probs
        return {label: p.copy() for label, p in state["results"][key].items()}
    refine.__name__ = "g4seg"
    return refine


def compose(*refiners: Refiner) -> Refiner:
    """Apply refiners left to right."""
    def refine(image, probs):
        out = dict(probs)
        for r in refiners:
            out = r(image, out)
        return out
    refine.__name__ = "+".join(getattr(r, "__name__", "?") for r in refiners)
    return refine


def make_refiner(name: str, pipeline=None, config=None,
                 options: Optional[Mapping[str, Dict]] = None,
                 shared: Optional[Dict[str, Refiner]] = None) -> Refiner:
    """Build a refiner by name (see module doc); ``options[base_name]`` are its kwargs.

    ``shared``: a dict reused across calls so that chains share one instance of each
    base refiner (e.g. the g4seg step of ``g4seg`` and ``g4seg+densecrf``, whose
    per-image cache then runs G4Seg once).
    """
    options = dict(options or {})
    parts = [p.strip().lower() for p in str(name).split("+")]
    built = []
    for part in parts:
        kw = dict(options.get(part, {}))
        if shared is not None and part in shared:
            built.append(shared[part])
            continue
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
            raise G4SegError(f"unknown refiner {part!r} in {name!r}: choose from {', '.join(BASE_REFINERS)} "
                             "or chain them with '+', e.g. g4seg+densecrf")
        if shared is not None:
            shared[part] = built[-1]
    if len(built) == 1:
        return built[0]
    return compose(*built)


def needs_pipeline(name: str) -> bool:
    return "g4seg" in [p.strip().lower() for p in str(name).split("+")]


def needs_crf(name: str) -> bool:
    return "densecrf" in [p.strip().lower() for p in str(name).split("+")]
