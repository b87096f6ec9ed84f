"""Binary coarse masks -> probability maps (SPEC step 10).

A hard 0/1 mask has no pixel inside the coarse-filtering band and cannot cross the
threshold, so ``soften_binary`` turns it into a probability map first, and says in its
description which softening was used.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..config import SOFTEN_MODES
from .distance_transform import signed_distance_maps
from ..errors import G4SegError
from .masks import is_binary, map_stats, map_tensor, validate_probability, values_ok


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of float32 maps [B, H, W] on their device, replicate border, clamped."""
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float().to(maps.device)
    t = maps.float()[:, None]
    # Replicate padding: a mask touching the image border stays 1 at the border.
    t = F.pad(t, (radius, radius, 0, 0), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, radius, radius), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, -1, 1))
    return t[:, 0].clamp_(0.0, 1.0)


def soften_maps(maps: torch.Tensor, mode: str, width: float) -> torch.Tensor:
    """The softening of _soften_binary for binary maps [B, H, W] (checked, not empty or full), as a
    batch on their device: float32 [B, H, W]. `width` in pixels of these maps; mode "sdf" or "blur"."""
    rounded = torch.round(maps.float())
    if mode == "sdf":
        # float64 like the numpy reference (MPS has none: float32 there)
        wide = torch.float32 if maps.device.type == "mps" else torch.float64
        sd = signed_distance_maps(rounded > 0.5).to(maps.device, wide)
        return (1.0 / (1.0 + torch.exp(-sd / (width / 4.0)))).float()
    if mode == "blur":
        return _gaussian_blur(rounded, width / 2.0)
    raise G4SegError(f"soften={mode!r}: soften_maps softens with 'sdf' or 'blur'")


def _description(mode: str, width: float) -> str:
    if mode == "sdf":
        return (f"binary input softened: sigmoid(signed distance / {width / 4.0:g} px) "
                f"(soften='sdf', width={width:g} px)")
    return (f"binary input softened: Gaussian blur, sigma {width / 2.0:g} px "
            f"(soften='blur', width={width:g} px)")


def _check_width(width) -> float:
    width = float(width)
    if not (math.isfinite(width) and width > 0):
        raise G4SegError(f"soften_width={width}: use a width in pixels > 0 (default 8), "
                         f"or soften='none' to keep the binary mask")
    return width


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
    width = _check_width(width)
    soft = soften_maps(torch.from_numpy(arr)[None], mode, width)[0].numpy()
    return soft, _description(mode, width)


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


Groups = List[Tuple[List[int], torch.Tensor]]


def prepare_coarse_batch(masks: Sequence, device, working_size: int = 512, soften: str = "sdf", width: float = 8.0,
                         check_shape: Optional[Callable[[int, Tuple[int, int]], None]] = None
                         ) -> Tuple[Groups, List[str]]:
    """prepare_coarse for a batch, on `device`: ([(rows, their maps float32 [n, H, W])] per mask size in order
    of first appearance, one description per mask).

    The maps of one size move to the device together and are checked there with one host sync for the
    whole batch; binary ones are softened there as a batch. A mask that fails a check raises the error
    prepare_coarse would (the numpy checks are run on it to word it), the first such mask in batch order
    first. `check_shape(row, (H, W))` runs after a mask's value checks (the flow's framing check).
    """
    tensors: List[Any] = []
    for mask in masks:
        t = map_tensor(mask)
        if t is None:  # an odd type or shape: validate_probability converts it or words the problem
            try:
                t = torch.from_numpy(validate_probability(mask, name="mask"))
            except G4SegError as exc:
                t = exc
        tensors.append(t)
    rows_of: Dict[Tuple[int, int], List[int]] = {}
    for row, t in enumerate(tensors):
        if isinstance(t, torch.Tensor):
            rows_of.setdefault(tuple(t.shape), []).append(row)
    groups: Groups = []
    for rows in rows_of.values():
        parts = [tensors[r] for r in rows]
        if all(p.device.type == "cpu" for p in parts):
            maps = torch.stack(parts).to(device)  # one copy to the device per mask size
        else:
            maps = torch.stack([p.to(device) for p in parts])
        groups.append((rows, maps))
    stats_of: Dict[int, List[float]] = {}
    if groups:
        stats = torch.cat([map_stats(maps) for _, maps in groups]).cpu().tolist()  # the one host sync
        stats_of = dict(zip([r for rows, _ in groups for r in rows], stats))

    def numpy_checks(row: int) -> None:
        """The single-mask path on this mask: it raises the error the batched numbers found."""
        soften_checked(validate_probability(masks[row], name="mask"), working_size, soften, width)
        raise AssertionError(f"mask {row}: the batched checks and the numpy checks disagree")

    descriptions: List[str] = []
    soften_rows: Dict[int, List[int]] = {}  # group -> its rows to soften
    widths: Dict[int, float] = {}
    group_of = {r: g for g, (rows, _) in enumerate(groups) for r in rows}
    for row, t in enumerate(tensors):
        if isinstance(t, G4SegError):
            raise t
        nonfinite, lo, hi, binary, ones = stats_of[row]
        if not values_ok(nonfinite, lo, hi):
            validate_probability(masks[row], name="mask")
            raise AssertionError(f"mask {row}: the batched checks and validate_probability disagree")
        shape = (int(t.shape[0]), int(t.shape[1]))
        if check_shape is not None:
            check_shape(row, shape)
        if hi <= 0.0 or lo >= 1.0:
            numpy_checks(row)
        if binary and soften != "none":
            if soften not in SOFTEN_MODES or ones == 0 or ones == t.numel():
                numpy_checks(row)
            w = _check_width(width * (max(shape) / float(working_size)))  # soften_checked's arithmetic
            g = group_of[row]
            soften_rows.setdefault(g, []).append(row)
            widths[g] = w
            descriptions.append(_description(soften, w))
        else:
            descriptions.append("binary input, softening off" if binary else "soft input, not softened")
    out: Groups = []
    for g, (rows, maps) in enumerate(groups):
        maps = maps.clamp(0.0, 1.0)  # validate_probability's clipping of round-off (a copy: inputs stay as given)
        if g in soften_rows:
            local = torch.tensor([rows.index(r) for r in soften_rows[g]], device=maps.device)
            maps[local] = soften_maps(maps.index_select(0, local), soften, widths[g])
        out.append((rows, maps))
    return out, descriptions
