"""Probability maps in memory: validation and resizing.

Conventions (docs/ARCHITECTURE.md): a probability map is a float32 numpy array [H, W]
with values in [0, 1]. The functions here take and return numpy arrays (torch tensors
are accepted as input and converted), except resize_maps and the batch helpers at the end
(map_tensor, map_stats), which keep a batch of maps as tensors on its device. Problems a
user can cause raise G4SegError naming the fix. Files: mask_files.py; softening:
softening.py; label maps: label_maps.py.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import G4SegError
RESIZE_MODES = ("bilinear", "nearest", "area")


# Values this far outside [0, 1] are float round-off and are clipped, not rejected.
_RANGE_TOLERANCE = 1e-4


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def check_hw(size_hw, what: str = "size") -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size_hw)
    except (TypeError, ValueError):
        raise G4SegError(f"{what}={size_hw!r}: give (height, width) as two positive integers") from None
    if h <= 0 or w <= 0:
        raise G4SegError(f"{what}={size_hw!r}: give (height, width) as two positive integers")
    return h, w


def validate_probability(prob, name: str = "mask") -> np.ndarray:
    """Check a probability map and return it as a float32 [H, W] numpy array.

    Must be 2-D, numeric, finite and within [0, 1] (values within 1e-4 of the range are
    round-off and clipped). Boolean arrays become 0/1. Raises G4SegError naming the
    problem and the fix.
    """
    arr = as_numpy(prob)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise G4SegError(f"{name} has dtype {arr.dtype}: give a numeric [H, W] array of "
                         f"probabilities in [0, 1]")
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            hint = " (it has a single channel: drop it, e.g. mask[0] or mask[..., 0])"
        elif arr.ndim == 3:
            hint = (" (several channels: for a colour/palette label map use load_label_map "
                    "and pick a class; for one map per class pass them one at a time)")
        raise G4SegError(f"{name} has shape {tuple(arr.shape)}; a single [H, W] map is "
                         f"needed{hint}")
    if arr.size == 0:
        raise G4SegError(f"{name} is empty (shape {tuple(arr.shape)}); give a non-empty [H, W] map")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        parts = []
        if n_nan:
            parts.append(f"{n_nan} NaN value{'s' if n_nan != 1 else ''}")
        if n_inf:
            parts.append(f"{n_inf} infinite value{'s' if n_inf != 1 else ''}")
        raise G4SegError(
            f"{name} contains {' and '.join(parts)} (of {arr.size} pixels); replace them before "
            f"refining, e.g. numpy.nan_to_num(mask, nan=0.0, posinf=1.0, neginf=0.0), and check "
            f"the segmenter that produced it (a division by zero when normalising a CAM is the "
            f"usual cause)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        if hi <= 255.0 and lo >= 0.0 and hi > 1.0:
            fix = "it looks like 0..255 values: divide by 255"
        elif hi <= 65535.0 and lo >= 0.0 and hi > 255.0:
            fix = "it looks like 16-bit values: divide by 65535"
        else:
            fix = ("if these are logits apply a sigmoid; if it is an unnormalised score map "
                   "(e.g. a CAM) rescale it, (x - min) / (max - min)")
        raise G4SegError(f"{name} has values in [{lo:g}, {hi:g}], outside [0, 1]; {fix}")
    if lo < 0.0 or hi > 1.0:
        arr = np.clip(arr, 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_same_framing(image_hw: Sequence[int], mask_hw: Sequence[int], tolerance: float = 0.04) -> None:
    """A mask may have any resolution, but the image's aspect ratio (within 4%: rounding of odd sizes)."""
    ih, iw = check_hw(image_hw, "image size")
    mh, mw = check_hw(mask_hw, "mask size")
    if abs(mw / mh - iw / ih) / (iw / ih) > tolerance:
        raise G4SegError(f"the mask is {mw}x{mh} (width x height) but the image is {iw}x{ih}: the aspect ratios "
                         "differ, so the mask does not show the image's framing. Check that the mask belongs to "
                         "this image (any resolution with the image's aspect ratio works)")


def is_binary(prob) -> bool:
    """True if every value is exactly 0 or 1 (within 1e-6)."""
    arr = as_numpy(prob)
    if arr.dtype == bool:
        return True
    arr = arr.astype(np.float32, copy=False)
    return bool(np.all((np.abs(arr) <= 1e-6) | (np.abs(arr - 1.0) <= 1e-6)))


def resize_probability(prob, size_hw: Sequence[int], mode: str = "bilinear") -> np.ndarray:
    """Resize a probability map to ``size_hw`` = (H, W) with torch interpolate.

    ``"bilinear"`` (align_corners=False, antialiased when shrinking), ``"nearest"``
    (``nearest-exact``, pixel-centre sampling like PIL; keeps binary masks binary) or
    ``"area"`` (box average; for shrinking). Returns float32 [H, W] in [0, 1].
    """
    arr = validate_probability(prob)
    h, w = check_hw(size_hw)
    if mode not in RESIZE_MODES:
        raise G4SegError(f"resize mode {mode!r}: choose one of {RESIZE_MODES}")
    if arr.shape == (h, w):
        return arr.copy()
    return resize_maps(torch.from_numpy(arr)[None], (h, w), mode)[0].numpy()


def resize_maps(maps: torch.Tensor, size_hw: Sequence[int], mode: str = "bilinear") -> torch.Tensor:
    """resize_probability for checked maps [B, H, W] (float, any device), all at once; [B, h, w] back."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if tuple(maps.shape[-2:]) == (h, w):
        return maps.clone()
    t = maps.float()[:, None]
    if mode == "bilinear":
        shrinking = h < maps.shape[-2] or w < maps.shape[-1]
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=shrinking)
    elif mode == "nearest":
        out = F.interpolate(t, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(h, w), mode="area")
    return out[:, 0].clamp_(0.0, 1.0)


# ---- batches of maps as tensors: the checks above with one host sync ----------------------------
def map_tensor(prob) -> Optional[torch.Tensor]:
    """A numeric [H, W] map as a float32 tensor (numpy float32 shared, not copied; tensors stay on
    their device), or None when validate_probability has something to say about its type or shape."""
    if isinstance(prob, torch.Tensor):
        t = prob.detach()
        if t.dim() != 2 or t.numel() == 0 or t.is_complex():
            return None
        return t if t.dtype == torch.float32 else t.float()
    if not isinstance(prob, np.ndarray) or prob.ndim != 2 or prob.size == 0 or prob.dtype.kind not in "biuf":
        return None
    arr = np.ascontiguousarray(prob, dtype=np.float32)  # no copy for a contiguous float32 map
    if not arr.flags.writeable:  # e.g. np.asarray(a PIL image): torch wants memory it may write
        arr = arr.copy()
    return torch.from_numpy(arr)


STAT_NAMES = ("nonfinite", "min", "max", "binary", "ones")


def map_stats(maps: torch.Tensor) -> torch.Tensor:
    """Per map of float32 [n, H, W] (any device): float64 [n, 5] in STAT_NAMES' order, on the same device.

    nonfinite: NaN/inf count; min, max: of the raw values; binary: 1 when every value clipped to [0, 1]
    is within 1e-6 of 0 or 1 (is_binary); ones: how many clipped values round to 1. Read once on the
    host (one sync for the batch), they decide what validate_probability, soften_checked and
    _soften_binary would say, in the same float32 arithmetic."""
    flat = maps.reshape(maps.shape[0], -1)
    nonfinite = (~torch.isfinite(flat)).sum(dim=1)
    clipped = flat.clamp(0.0, 1.0)
    binary = ((clipped.abs() <= 1e-6) | ((clipped - 1.0).abs() <= 1e-6)).all(dim=1)
    ones = (torch.round(clipped) != 0).sum(dim=1)
    return torch.stack([nonfinite.double(), flat.amin(dim=1).double(), flat.amax(dim=1).double(),
                        binary.double(), ones.double()], dim=1)


def values_ok(nonfinite: float, lo: float, hi: float) -> bool:
    """validate_probability's value checks on map_stats numbers (finite, within the range's tolerance)."""
    return nonfinite == 0 and not (lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE)
