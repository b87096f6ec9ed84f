"""Segmentation metrics: IoU, confusion-matrix mIoU, Boundary IoU, mBA.

Everything is numpy only and exact (no OpenCV):

- ``iou(pred, gt)``: binary IoU; two empty masks agree perfectly (1.0, ``empty=`` changes it).
- ``ConfusionMatrix``: one matrix accumulated over a whole dataset (rows = ground truth,
  columns = prediction), ``ignore_index`` (255) pixels skipped. ``per_class_iou()`` is NaN
  for a class that appears in neither the prediction nor the ground truth of *any* pixel
  seen so far; ``miou()`` is the mean over the other classes (``nanmean``), the
  convention of mmseg / the VOC devkit. Matrices merge with ``+`` (shards).
- ``boundary_iou(pred, gt, dilation_ratio=0.02)``: Cheng et al., "Boundary IoU" (CVPR
  2021). The boundary band of a mask is the mask minus its erosion by ``d = round(ratio *
  image diagonal)`` (at least 1) px. Their reference erodes ``d`` times with a 3x3 square
  after padding the image with one pixel of background; that is exactly an erosion by a
  (2d+1)x(2d+1) square (chessboard distance <= d) with everything outside the image
  counting as background. We compute the same erosion exactly in O(HW) with an integral
  image of the background.
- ``mba(pred, gt)``: CascadePSP's mean boundary accuracy. For 5 radii
  ``r_i = 1 + int((R - 1) / 5 * i)``, ``R = (W + H) / 300``, ``i = 0..4`` (CascadePSP's own
  formula: the largest radius used is 1 + int(0.8 (R-1)), not R), the band is the
  morphological gradient (dilation minus erosion) of the ground truth with a disk of
  radius r, rasterised as OpenCV's ``MORPH_ELLIPSE`` (half width ``rint(sqrt(r^2 - dy^2))``
  on row dy) and with the image edge not counting as a boundary; the accuracy is the
  fraction of band pixels where pred == gt. mBA is the mean over the radii. NaN when the
  ground truth has no boundary at all (empty or full mask).

A 512x512 mask takes a few milliseconds for each metric.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import G4SegError

__all__ = [
    "iou", "as_bool_mask", "ConfusionMatrix", "boundary_band", "boundary_counts", "boundary_iou",
    "boundary_dilation", "mba", "mba_radii", "erode_square", "dilate_disk", "erode_disk",
    "grey_dilate_disk", "grey_erode_disk", "disk_half_widths",
]


# ----------------------------------------------------------------------------- helpers

def as_bool_mask(mask, name: str = "mask") -> np.ndarray:
    """A 2-D mask as bool: floats at >= 0.5, integers and others at != 0."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise G4SegError(f"{name} must be a 2-D mask [H, W], got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= 0.5
    return arr != 0


def _same_shape(a: np.ndarray, b: np.ndarray, what: str = "pred and gt") -> None:
    if a.shape != b.shape:
        raise G4SegError(f"{what} must have the same size, got {a.shape} and {b.shape}; "
                         "resize the prediction to the ground-truth size first")


def _box_any(indicator: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """True where the (2ry+1)x(2rx+1) window (clipped to the image) holds any True."""
    h, w = indicator.shape
    ii = np.zeros((h + 2 * ry + 1, w + 2 * rx + 1), dtype=np.int32)
    ii[ry + 1:ry + 1 + h, rx + 1:rx + 1 + w] = indicator
    np.cumsum(ii, axis=0, out=ii)
    np.cumsum(ii, axis=1, out=ii)
    ky, kx = 2 * ry + 1, 2 * rx + 1
    total = ii[ky:ky + h, kx:kx + w] - ii[:h, kx:kx + w] - ii[ky:ky + h, :w] + ii[:h, :w]
    return total > 0


def erode_square(mask: np.ndarray, radius: int, outside: bool = False) -> np.ndarray:
    """Binary erosion by a (2r+1)^2 square; pixels outside the image count as ``outside``."""
    mask = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    if outside:
        return ~_box_any(~mask, radius, radius)
    padded = np.ones((h + 2 * radius, w + 2 * radius), dtype=bool)  # outside = background
    padded[radius:radius + h, radius:radius + w] = ~mask
    hit = _box_any(padded, radius, radius)[radius:radius + h, radius:radius + w]
    return ~hit


def disk_half_widths(radius: int, style: str = "euclidean") -> np.ndarray:
    """Half width of a digital disk on each row dy = -r..r.

    ``euclidean``: all (dx, dy) with dx^2 + dy^2 <= r^2.
    ``opencv``: OpenCV's MORPH_ELLIPSE of size (2r+1, 2r+1): rint(sqrt(r^2 - dy^2)).
    """
    r = int(radius)
    dy = np.arange(-r, r + 1, dtype=np.float64)
    inside = np.maximum(r * r - dy * dy, 0.0)
    if style == "euclidean":
        return np.floor(np.sqrt(inside) + 1e-9).astype(np.int64)
    if style == "opencv":
        return np.rint(np.sqrt(inside)).astype(np.int64)
    raise G4SegError(f"disk style {style!r}: choose 'euclidean' or 'opencv'")


def _row_dilate(mask: np.ndarray, half: int) -> np.ndarray:
    """Horizontal binary dilation by a segment of half width ``half`` (no wrap-around)."""
    if half <= 0:
        return mask.copy()
    h, w = mask.shape
    cs = np.zeros((h, w + 1), dtype=np.int32)
    np.cumsum(mask, axis=1, dtype=np.int32, out=cs[:, 1:])
    x0 = np.clip(np.arange(w) - half, 0, w)
    x1 = np.clip(np.arange(w) + half + 1, 0, w)
    return (cs[:, x1] - cs[:, x0]) > 0


def dilate_disk(mask: np.ndarray, radius: int, style: str = "euclidean") -> np.ndarray:
    """Binary dilation by a disk; pixels outside the image are background. O(HW r)."""
    mask = np.asarray(mask, dtype=bool)
    r = int(radius)
    if r <= 0:
        return mask.copy()
    h, w = mask.shape
    halves = disk_half_widths(r, style)
    rows = {int(k): _row_dilate(mask, int(k)) for k in np.unique(halves)}
    out = np.zeros_like(mask)
    for i, dy in enumerate(range(-r, r + 1)):
        src = rows[int(halves[i])]
        # out[y] |= src[y + dy]
        if dy >= 0:
            if dy < h:
                out[:h - dy] |= src[dy:]
        else:
            if -dy < h:
                out[-dy:] |= src[:h + dy]
    return out


def erode_disk(mask: np.ndarray, radius: int, style: str = "euclidean",
               outside: bool = True) -> np.ndarray:
    """Binary erosion by a disk. ``outside=True``: the image edge does not erode."""
    mask = np.asarray(mask, dtype=bool)
    r = int(radius)
    if r <= 0:
        return mask.copy()
    if outside:
        return ~dilate_disk(~mask, r, style)
    h, w = mask.shape
    padded = np.zeros((h + 2 * r, w + 2 * r), dtype=bool)
    padded[r:r + h, r:r + w] = mask
    return erode_disk(padded, r, style, outside=True)[r:r + h, r:r + w]


def _grey_morph(values: np.ndarray, radius: int, op, fill: float, style: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float32)
    r = int(radius)
    if r <= 0:
        return values.copy()
    h, w = values.shape
    halves = disk_half_widths(r, style)
    padded = np.full((h + 2 * r, w + 2 * r), fill, dtype=np.float32)
    padded[r:r + h, r:r + w] = values
    out = np.full((h, w), fill, dtype=np.float32)
    for i, dy in enumerate(range(-r, r + 1)):
        k = int(halves[i])
        for dx in range(-k, k + 1):
            op(out, padded[r + dy:r + dy + h, r + dx:r + dx + w], out=out)
    return out


def grey_dilate_disk(values: np.ndarray, radius: int, style: str = "euclidean") -> np.ndarray:
    """Grey-level dilation (max filter over a disk); meant for small radii (O(HW r^2))."""
    return _grey_morph(values, radius, np.maximum, -np.inf, style)


def grey_erode_disk(values: np.ndarray, radius: int, style: str = "euclidean") -> np.ndarray:
    """Grey-level erosion (min filter over a disk), the image edge does not erode."""
    return _grey_morph(values, radius, np.minimum, np.inf, style)


# ----------------------------------------------------------------------------- IoU

def iou(pred, gt, empty: float = 1.0, valid: Optional[np.ndarray] = None) -> float:
    """Binary IoU of two masks (bool, 0/1 or probabilities thresholded at 0.5).

    ``valid``: optional bool mask of pixels to count (e.g. ``gt_labels != 255``).
    Returns ``empty`` when both masks are empty.
    """
    p = as_bool_mask(pred, "pred")
    g = as_bool_mask(gt, "gt")
    _same_shape(p, g)
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        _same_shape(v, g, "valid and gt")
        p = p & v
        g = g & v
    inter = int(np.count_nonzero(p & g))
    union = int(np.count_nonzero(p | g))
    return float(empty) if union == 0 else inter / union


class ConfusionMatrix:
    """A dataset-level confusion matrix; rows are ground truth, columns prediction.

    >>> cm = ConfusionMatrix(21); cm.update(pred, gt); cm.miou()
    """

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255,
                 matrix: Optional[np.ndarray] = None):
        if int(num_classes) < 1:
            raise G4SegError(f"num_classes={num_classes}: need at least 1 class")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        n = self.num_classes
        if matrix is None:
            self.matrix = np.zeros((n, n), dtype=np.int64)
        else:
            m = np.asarray(matrix, dtype=np.int64)
            if m.shape != (n, n):
                raise G4SegError(f"confusion matrix has shape {m.shape}, expected {(n, n)}")
            self.matrix = m.copy()

    # -- accumulation
    def update(self, pred, gt) -> "ConfusionMatrix":
        pred = np.asarray(pred)
        gt = np.asarray(gt)
        _same_shape(pred, gt)
        n = self.num_classes
        g = gt.reshape(-1).astype(np.int64)
        p = pred.reshape(-1).astype(np.int64)
        keep = np.ones(g.shape, dtype=bool) if self.ignore_index is None else g != self.ignore_index
        g = g[keep]
        p = p[keep]
        if g.size:
            if g.min() < 0 or g.max() >= n:
                bad = sorted(set(np.unique(g[(g < 0) | (g >= n)]).tolist()))[:10]
                raise G4SegError(f"ground truth holds labels {bad} outside 0..{n - 1} "
                                 f"(ignore_index={self.ignore_index}); check --num-classes")
            if p.min() < 0 or p.max() >= n:
                bad = sorted(set(np.unique(p[(p < 0) | (p >= n)]).tolist()))[:10]
                raise G4SegError(f"prediction holds labels {bad} outside 0..{n - 1} on "
                                 "pixels that are not ignored")
            self.matrix += np.bincount(g * n + p, minlength=n * n).reshape(n, n)
        return self

    def add_entries(self, entries: Iterable[Sequence[int]]) -> "ConfusionMatrix":
        """Add sparse ``[gt, pred, count]`` triples (see ``sparse()``)."""
        for g, p, c in entries:
            self.matrix[int(g), int(p)] += int(c)
        return self

    def sparse(self) -> List[List[int]]:
        g, p = np.nonzero(self.matrix)
        return [[int(a), int(b), int(self.matrix[a, b])] for a, b in zip(g, p)]

    # -- metrics
    def per_class_iou(self) -> np.ndarray:
        """IoU per class; NaN for classes absent from both prediction and ground truth."""
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        denom = m.sum(0) + m.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes seen in prediction or ground truth (NaN if none)."""
        per = self.per_class_iou()
        return float(np.nanmean(per)) if np.any(~np.isnan(per)) else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.matrix) / total) if total else float("nan")

    # -- merging / serialisation
    def _check_compatible(self, other: "ConfusionMatrix") -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot add ConfusionMatrix and {type(other).__name__}")
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise G4SegError(
                f"cannot merge confusion matrices with {self.num_classes}/{other.num_classes} "
                f"classes and ignore_index {self.ignore_index}/{other.ignore_index}")

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.matrix + other.matrix)

    def __radd__(self, other):
        if other == 0:  # sum([...])
            return self.copy()
        return self.__add__(other)

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        self.matrix += other.matrix
        return self

    def __eq__(self, other) -> bool:
        return (isinstance(other, ConfusionMatrix) and other.num_classes == self.num_classes
                and other.ignore_index == self.ignore_index
                and np.array_equal(other.matrix, self.matrix))

    def copy(self) -> "ConfusionMatrix":
        return ConfusionMatrix(self.num_classes, self.ignore_index, self.matrix)

    def to_dict(self) -> dict:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "ConfusionMatrix":
        try:
            return cls(data["num_classes"], data.get("ignore_index", 255), data["matrix"])
        except KeyError as exc:
            raise G4SegError(f"confusion-matrix dict lacks {exc}; expected keys "
                             "num_classes, ignore_index, matrix") from None

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, mIoU={self.miou():.4f})"


# ----------------------------------------------------------------------------- Boundary IoU

def boundary_dilation(shape: Tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """Band width in pixels: round(ratio * image diagonal), at least 1."""
    h, w = shape
    return max(1, int(round(dilation_ratio * math.sqrt(h * h + w * w))))


def boundary_band(mask, dilation_ratio: float = 0.02, dilation: Optional[int] = None) -> np.ndarray:
    """Pixels of ``mask`` within chessboard distance d of the background (or image edge)."""
    m = as_bool_mask(mask, "mask")
    d = boundary_dilation(m.shape, dilation_ratio) if dilation is None else int(dilation)
    return m & ~erode_square(m, d, outside=False)


def boundary_counts(pred, gt, dilation_ratio: float = 0.02,
                    valid: Optional[np.ndarray] = None) -> Tuple[int, int]:
    """(intersection, union) of the two boundary bands, restricted to ``valid`` pixels."""
    p = as_bool_mask(pred, "pred")
    g = as_bool_mask(gt, "gt")
    _same_shape(p, g)
    d = boundary_dilation(g.shape, dilation_ratio)
    bp = boundary_band(p, dilation=d)
    bg = boundary_band(g, dilation=d)
    if valid is not None:
        v = np.asarray(valid, dtype=bool)
        bp &= v
        bg &= v
    return int(np.count_nonzero(bp & bg)), int(np.count_nonzero(bp | bg))


def boundary_iou(pred, gt, dilation_ratio: float = 0.02, empty: float = 1.0,
                 valid: Optional[np.ndarray] = None) -> float:
    """Boundary IoU (Cheng et al. 2021) of two binary masks; ``empty`` if both are empty."""
    inter, union = boundary_counts(pred, gt, dilation_ratio, valid)
    return float(empty) if union == 0 else inter / union


# ----------------------------------------------------------------------------- mBA

def mba_radii(shape: Tuple[int, int], steps: int = 5) -> List[int]:
    """CascadePSP's radii: 1 + int((R - 1) / steps * i), R = (W + H) / 300."""
    h, w = shape
    max_r = (w + h) / 300.0
    return [1 + int((max_r - 1) / steps * i) for i in range(steps)]


def mba(pred, gt, steps: int = 5, valid: Optional[np.ndarray] = None) -> float:
    """CascadePSP mean boundary accuracy of binary masks (NaN if gt has no boundary)."""
    p = as_bool_mask(pred, "pred")
    g = as_bool_mask(gt, "gt")
    _same_shape(p, g)
    v = None if valid is None else np.asarray(valid, dtype=bool)
    agree = p == g
    accs = []
    cache: Dict[int, float] = {}
    for r in mba_radii(g.shape, steps):
        if r not in cache:
            band = dilate_disk(g, r, "opencv") & ~erode_disk(g, r, "opencv", outside=True)
            if v is not None:
                band &= v
            n = int(np.count_nonzero(band))
            cache[r] = float("nan") if n == 0 else int(np.count_nonzero(agree & band)) / n
        accs.append(cache[r])
    return float(np.mean(accs))
