"""Foreground probability update (paper Eq. 9) with coarse filtering (Table III).

S*[j] = beta*S[j] + (1-beta)*S[delta_j] where low <= S[j] <= high, S[j] elsewhere.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch

from ..config import DIRECTIONS
from .correspondence import grid_match_to_pixels, match_features, match_upsampled_features, resample_features
from ..errors import G4SegError


def check_probability(prob: torch.Tensor, name: str = "probability map") -> torch.Tensor:
    if prob.dim() != 2:
        raise G4SegError(f"{name} must be 2-D [H, W], got shape {tuple(prob.shape)}")
    if not torch.isfinite(prob).all():
        bad = int((~torch.isfinite(prob)).sum())
        raise G4SegError(f"{name} has {bad} NaN/infinite value(s): fix the coarse segmenter's output "
                         "(e.g. numpy.nan_to_num) before refining")
    if prob.numel() and (float(prob.min()) < 0.0 or float(prob.max()) > 1.0):
        raise G4SegError(f"{name} values lie in [{float(prob.min()):.3g}, {float(prob.max()):.3g}], outside [0, 1]: "
                         "pass probabilities (divide 8-bit masks by 255) or a 0/1 mask")
    return prob


def mix_foreground(prob, delta, beta: float = 0.8, band: Sequence[float] = (0.2, 0.6),
                   iterations: int = 1):
    """Eq. 9 + coarse filtering, `iterations` times. numpy in -> numpy out, torch -> torch."""
    as_numpy = isinstance(prob, np.ndarray)
    s = torch.as_tensor(np.asarray(prob) if as_numpy else prob).float()
    d = torch.as_tensor(np.asarray(delta) if isinstance(delta, np.ndarray) else delta).to(s.device)
    check_probability(s)
    if d.shape != s.shape or d.dtype not in (torch.int64, torch.int32):
        raise G4SegError(f"correspondence must be an integer map of shape {tuple(s.shape)}, "
                         f"got {tuple(d.shape)} {d.dtype}")
    if d.numel() and (int(d.min()) < 0 or int(d.max()) >= s.numel()):
        raise G4SegError("correspondence indices fall outside the probability map")
    if not 0.0 <= beta <= 1.0:
        raise G4SegError(f"beta={beta}: use 0..1")
    low, high = float(band[0]), float(band[1])
    if not 0.0 <= low <= high <= 1.0:
        raise G4SegError(f"band={tuple(band)}: use (low, high) with 0 <= low <= high <= 1")
    if iterations < 1:
        raise G4SegError(f"iterations={iterations}: use >= 1")
    s = mix_probabilities(s, d, beta, band, iterations)
    return s.numpy() if as_numpy else s


def mix_probabilities(prob: torch.Tensor, delta: torch.Tensor, beta: float, band: Sequence[float],
                      iterations: int) -> torch.Tensor:
    """Eq. 9 + coarse filtering on checked tensors: prob [..., H, W] float, delta the same shape (flat indices
    within each map). Maps of a batch mix at once; nothing is read on the host."""
    low, high = float(band[0]), float(band[1])
    shape = prob.shape
    s = prob.reshape(-1, shape[-2] * shape[-1])
    flat_index = delta.long().reshape(s.shape)
    for _ in range(int(iterations)):
        uncertain = (s >= low) & (s <= high)
        matched = s.gather(1, flat_index)
        s = torch.where(uncertain, beta * s + (1.0 - beta) * matched, s)
    return s.view(shape)


def correspondence_for(orig_feats: torch.Tensor, gen_feats: torch.Tensor, out_hw: Tuple[int, int],
                       direction: str = "original_to_generated", grid: int = 0, check: bool = True):
    """Match at the feature grid, carry to pixels. Returns (grid match [h, w], pixel delta [H, W]); feature
    maps [B, C, h, w] give [B, h, w] and [B, H, W] (one batched match). `check`: the finite check."""
    if direction not in DIRECTIONS:
        raise G4SegError(f"direction={direction!r}: choose one of {DIRECTIONS}")
    if orig_feats.shape != gen_feats.shape:
        raise G4SegError(f"original and generated features differ in shape: {tuple(orig_feats.shape)} vs "
                         f"{tuple(gen_feats.shape)}: extract both at the same size")
    match = feature_match(orig_feats, gen_feats, direction, grid, check)
    return match, grid_match_to_pixels(match, int(out_hw[0]), int(out_hw[1]))


def feature_match(orig_feats: torch.Tensor, gen_feats: torch.Tensor, direction: str, grid: int,
                  check: bool = True) -> torch.Tensor:
    """The grid match of Eq. 8 ([h, w], or [B, h, w] for [B, C, h, w] maps) in the chosen direction."""
    # original_to_generated: where each original location's content went; the other is Eq. 8 literally
    query, ref = (orig_feats, gen_feats) if direction == "original_to_generated" else (gen_feats, orig_feats)
    if grid and grid >= max(query.shape[-2:]):
        return match_upsampled_features(query, ref, grid, check=check)  # same result, far fewer operations
    return match_features(resample_features(query, grid), resample_features(ref, grid), check=check)


def update_from_features(prob, orig_feats: torch.Tensor, gen_feats: torch.Tensor, beta: float = 0.8,
                         band: Sequence[float] = (0.2, 0.6), iterations: int = 1,
                         direction: str = "original_to_generated", grid: int = 0):
    """Steps 6-9 in one call: match, carry the match to prob's resolution, mix."""
    shape = tuple(np.asarray(prob).shape) if isinstance(prob, np.ndarray) else tuple(prob.shape)
    if len(shape) != 2:
        raise G4SegError(f"probability map must be 2-D [H, W], got shape {shape}")
    _, delta = correspondence_for(orig_feats, gen_feats, shape, direction, grid)
    if isinstance(prob, np.ndarray):
        return mix_foreground(prob, delta.cpu().numpy(), beta, band, iterations)
    return mix_foreground(prob, delta.to(prob.device), beta, band, iterations)
