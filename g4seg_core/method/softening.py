"""Binary coarse masks -> probability maps (SPEC step 10).

A hard 0/1 mask has no pixel inside the coarse-filtering band and cannot cross the
threshold, so ``soften_binary`` turns it into a probability map first, and says in its
description which softening was used.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SOFTEN_MODES
from .distance_transform import signed_distance
from ..errors import G4SegError
from .masks import is_binary, validate_probability


def _gaussian_blur(prob: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    # Replicate padding: a mask touching the image border stays 1 at the border.
    t = F.pad(t, (radius, radius, 0, 0), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, radius, radius), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, -1, 1))
    return t[0, 0].clamp_(0.0, 1.0).numpy()


def soften_binary(
    prob,
    mode: str = "sdf",
    width: float = 8.0,
    allow_trivial: bool = False,
) -> Tuple[np.ndarray, str]:
    """Turn a binary mask into a probability map (SPEC step 10); returns (soft, description).

    * ``"sdf"``: ``sigmoid(signed_distance / (width / 4))`` with the exact Euclidean
      signed distance (``signed_distance``): 0.5 on the boundary, rising to ~0.88 at
      ``width / 2`` pixels inside and ~0.98 at ``width`` pixels; falling likewise
      outside. ``width`` is thus the distance over which the map goes from ~0.12 to
      ~0.88, in pixels of the map as given (the working size in the pipeline).
    * ``"blur"``: Gaussian blur with sigma ``width / 2`` (separable, replicate border).
    * ``"none"``: the mask unchanged.

    Soft inputs (any value strictly between 0 and 1) are returned unchanged with the
    description "soft input, not softened". An all-0 (empty) or all-1 (full) binary
    mask has nothing to refine, whatever the mode: G4SegError, unless
    ``allow_trivial=True``, which returns it unchanged (e.g. batch evaluation, where a
    class the coarse segmenter missed should simply stay missed).
    """
    return _soften_binary(validate_probability(prob), mode, width, allow_trivial)


def _soften_binary(arr: np.ndarray, mode: str, width: float, allow_trivial: bool) -> Tuple[np.ndarray, str]:
    """soften_binary on a validated float32 map."""
    if mode not in SOFTEN_MODES:
        raise G4SegError(f"soften={mode!r}: choose one of {SOFTEN_MODES}")
    if not is_binary(arr):
        return arr, "soft input, not softened"
    arr = np.round(arr).astype(np.float32)
    total = float(arr.sum())
    if total == 0.0 or total == float(arr.size):
        if allow_trivial:
            kind = "empty" if total == 0.0 else "full"
            return arr, f"{kind} mask, returned unchanged (nothing to refine)"
        if total == 0.0:
            raise G4SegError(
                "the coarse mask is empty (no foreground pixel), so there is nothing to refine: "
                "the class was not found by the coarse segmenter (or the wrong class/channel was "
                "picked): check the class name/index and the mask")
        raise G4SegError(
            "the coarse mask covers the whole image (every pixel is foreground), so there is no "
            "boundary to refine: check that the mask is not inverted and belongs to this class")
    if mode == "none":
        return arr, "binary input, not softened (soften='none')"
    width = float(width)
    if not (math.isfinite(width) and width > 0):
        raise G4SegError(f"soften_width={width}: use a width in pixels > 0 (default 8), "
                         f"or soften='none' to keep the binary mask")
    if mode == "sdf":
        scale = width / 4.0
        sd = signed_distance(arr > 0.5).astype(np.float64)
        soft = (1.0 / (1.0 + np.exp(-sd / scale))).astype(np.float32)
        return soft, (f"binary input softened: sigmoid(signed distance / {scale:g} px) "
                      f"(soften='sdf', width={width:g} px)")
    sigma = width / 2.0
    soft = _gaussian_blur(arr, sigma)
    return soft, (f"binary input softened: Gaussian blur, sigma {sigma:g} px "
                  f"(soften='blur', width={width:g} px)")


def prepare_coarse(mask, working_size: int = 512, soften: str = "sdf",
                   width: float = 8.0) -> Tuple[np.ndarray, str]:
    """The probability map G4Seg refines, at the mask's own resolution: (prob, description).

    Validates (NaN, range), refuses empty and full masks, and softens a binary mask (SPEC step
    10) with `width` given in working-size pixels (scaled to the mask's resolution). Soft maps
    are returned unchanged. Both the core pipeline and the ComfyUI nodes call this.
    """
    return soften_checked(validate_probability(mask, name="mask"), working_size, soften, width)


def soften_checked(prob: np.ndarray, working_size: int = 512, soften: str = "sdf",
                   width: float = 8.0) -> Tuple[np.ndarray, str]:
    """prepare_coarse on a map validate_probability already returned (the flow validates once at its entry)."""
    if float(prob.max()) <= 0.0:
        raise G4SegError("the mask is empty (all zero): the coarse segmenter found no pixel of this class, "
                         "so there is nothing to refine")
    if float(prob.min()) >= 1.0:
        raise G4SegError("the mask covers the whole image (all one): there is no boundary to refine")
    binary = is_binary(prob)
    if binary and soften != "none":
        scale = max(prob.shape) / float(working_size)
        return _soften_binary(prob, soften, width * scale, allow_trivial=False)
    return prob, "binary input, softening off" if binary else "soft input, not softened"


def uniform_map_warning(prob, threshold: float = 0.5) -> Optional[str]:
    """A sentence when a soft map holds one value everywhere (e.g. 0.5): a defined but empty result.

    Such a map has no boundary, so mixing cannot change it, and the binary output is the whole
    image or nothing; that is said rather than returned silently.
    """
    arr = np.asarray(prob, dtype=np.float32)
    if arr.size == 0 or float(arr.max()) - float(arr.min()) > 1e-6:
        return None
    value = float(arr.flat[0])
    side = "every pixel foreground" if value >= threshold else "no pixel foreground"
    return (f"the mask is {value:g} everywhere: it has no boundary, so nothing changes and the binary mask is "
            f"{side} (threshold {threshold:g}); check that the right file/channel was given")
