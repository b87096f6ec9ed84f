"""1-D linear resampling as a matrix: the weights of F.interpolate's (bi)linear mode, for separable products.

A bilinear resize of a map X [h, w] to [H, W] is A_y X A_xᵀ with A = linear_resampling_matrix; products
with A let the correspondence work on resized maps without building them (the segmenter upsamples with two
one-axis F.interpolate passes instead: its maps can be far larger, zeroshot/segment.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_resampling_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """[out_size, in_size] float32 matrix M with M @ x == F.interpolate(x, out_size, "linear", align_corners=False)
    (no antialias), built by resampling the identity, so the two agree by construction."""
    eye = torch.eye(int(in_size), dtype=torch.float32)[None]  # each row a unit impulse
    return F.interpolate(eye, size=int(out_size), mode="linear", align_corners=False)[0].t().contiguous()
