"""Explicit Mask Injection (EMI, paper §II-C1, Eq. 3-5): the attention math.

Shared by the diffusers pipeline (`diffusers_patch.py`) and the ComfyUI patches
(`nodes/comfy/attention_patch.py`): both hand us the projected q, k, v as [B, N, heads*d].

Two modes:
- "additive" (Eq. 5): softmax((QK^T + a*A) / sqrt(d)). Fused kernels add a float mask
  *after* the 1/sqrt(d) scale, so the bias handed to SDPA is a*A/sqrt(d); the user's
  weight `a` is on the Eq. 5 scale (before the 1/sqrt(d)).
- "densediffusion": DenseDiffusion's value-range aware modulation of L = QK^T/sqrt(d):
  L' = L + w (1 - s*area) [R (rowmax L - L) - (1 - R)(L - rowmin L)].
Both modes touch only the rows of foreground queries (m[i] = 1), as Eq. 3-4 do: a
background query's row of A is all zero. (For densediffusion this is our reading: applying
the negative term to background rows would flatten their attention to uniform.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import EMI_MODES as MODES
from ..config import emi_time_factor
from ..errors import G4SegError

# Bound on the logits block the densediffusion mode materialises for its row max/min (elements).
_DD_BLOCK_ELEMENTS = 1 << 22  # 8-16 MB of logits: larger blocks measured slower, smaller ones pay per-call costs


def grid_for_tokens(num_tokens: int, latent_h: int, latent_w: int) -> Tuple[int, int]:
    """Token grid of a UNet block: the latent grid halved (rounding up) per level."""
    h, w = int(latent_h), int(latent_w)
    for _ in range(10):
        if h * w == num_tokens:
            return h, w
        if h == 1 and w == 1:
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    raise G4SegError(
        f"cannot place {num_tokens} attention tokens on the {latent_h}x{latent_w} latent grid: "
        "this model's attention layout is not an SD1/SD2/SDXL UNet")


def mask_to_tokens(mask: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Mask [H, W] -> binary float [gh*gw] (area average, then >= 0.5 as SPEC step 4)."""
    if mask.dim() != 2:
        raise G4SegError(f"injection mask must be [H, W], got shape {tuple(mask.shape)}")
    small = F.interpolate(mask[None, None].float(), size=(gh, gw), mode="area")[0, 0]
    return (small >= 0.5).float().flatten()


def cross_attention_bias(mask_tokens: torch.Tensor, token_positions: Sequence[int],
                         num_keys: int, weight: float) -> torch.Tensor:
    """Eq. 3 times the weight: A[i, j] = 1 where m[i] = 1 and j is a class token."""
    text = torch.zeros(num_keys, dtype=mask_tokens.dtype, device=mask_tokens.device)
    positions = [p for p in token_positions if 0 <= p < num_keys]
    if len(positions) != len(token_positions):
        raise G4SegError(f"class token positions {list(token_positions)} fall outside the {num_keys} text keys")
    text[positions] = 1.0
    return weight * torch.outer(mask_tokens, text)


def self_attention_bias(mask_tokens: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 4 times the weight: A[i, j] = 1 where m[i] = m[j] = 1."""
    return weight * torch.outer(mask_tokens, mask_tokens)


def _key_vector(kind: str, mask_tokens: torch.Tensor, token_positions: Sequence[int], num_keys: int) -> torch.Tensor:
    """r of the rank-1 relation R = m r^T: class-token indicator (cross) or the mask (self)."""
    if kind == "cross":
        return cross_attention_bias(torch.ones(1, device=mask_tokens.device), token_positions, num_keys, 1.0)[0]
    if kind == "self":
        return (mask_tokens > 0.5).float()
    raise G4SegError(f"attention kind {kind!r}: use 'self' or 'cross'")


def densediffusion_strength(weight: float, area_scale: float, mask_tokens: torch.Tensor,
                            area: Optional[float] = None) -> float:
    """w (1 - s*area), area = foreground fraction of the block's grid (DenseDiffusion's size term)."""
    area = float(mask_tokens.float().mean()) if area is None else area
    return weight * max(0.0, 1.0 - area_scale * area)


def _modulate_rows(logits: torch.Tensor, relation: torch.Tensor, strength: float,
                   row_mask: torch.Tensor) -> torch.Tensor:
    rows = (row_mask > 0.5).to(logits.dtype)[:, None]
    row_max = logits.amax(dim=-1, keepdim=True)
    row_min = logits.amin(dim=-1, keepdim=True)
    push = torch.where(relation, row_max - logits, row_min - logits)
    return logits + strength * rows * push


def densediffusion_modulate(logits: torch.Tensor, relation: torch.Tensor, weight: float,
                            area_scale: float, mask_tokens: torch.Tensor) -> torch.Tensor:
    """DenseDiffusion's modulation of scaled logits [..., Nq, Nk] on foreground query rows.

    `mask_tokens` [Nq] (the whole grid) gives the rows to modulate and the area term;
    `relation` [Nq, Nk] is the 0/1 relation R.
    """
    strength = densediffusion_strength(weight, area_scale, mask_tokens)
    return _modulate_rows(logits, relation, strength, mask_tokens)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return _merge_heads(out)


def _additive(q, k, v, heads, bias):
    d = q.shape[-1] // heads
    attn_mask = (bias / math.sqrt(d)).to(q.dtype)[None, None]
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=attn_mask)
    return _merge_heads(out)


def _row_extremes(qh: torch.Tensor, kh: torch.Tensor, scale: float):
    """Row max and min of L = q k^T * scale, [B, heads, Nq] each (float32), in query chunks.

    q is scaled before the matmul (the logits themselves, as SDPA computes them: unscaled q k^T can
    overflow float16), and the extremes are taken in the matmul's own dtype: a float32 copy of every
    logit costs as much as the bfloat16 matmul itself.
    """
    b, h, nq, _ = qh.shape
    nk = kh.shape[2]
    chunk = max(1, min(nq, _DD_BLOCK_ELEMENTS // max(1, b * h * nk)))
    row_max = torch.empty(b, h, nq, dtype=qh.dtype, device=qh.device)
    row_min = torch.empty_like(row_max)
    # Contiguous once: the head-split views would otherwise be copied by every chunk's matmul.
    queries, keys_t = (qh * scale).contiguous(), kh.transpose(-1, -2).contiguous()
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        logits = torch.matmul(queries[:, :, start:stop], keys_t)
        row_max[:, :, start:stop] = logits.amax(dim=-1)
        row_min[:, :, start:stop] = logits.amin(dim=-1)
    return row_max.float(), row_min.float()


def _foreground_span(qh: torch.Tensor, kh: torch.Tensor, scale: float, rows: torch.Tensor,
                     select_rows: Optional[bool] = None) -> torch.Tensor:
    """max_i - min_i of L's rows, [B, heads, Nq] float32; 0 on background rows (`rows`: bool [Nq]).

    Background rows are not modulated (s_i = 0), so their span is never used. `select_rows` (default:
    on CPUs) computes the foreground rows only, saving the background's share of the extra q k^T
    pass; elsewhere all rows are computed, since selecting them needs their count on the host: a sync
    per layer costs a GPU more than the rows it skips.
    """
    if select_rows is None:
        select_rows = qh.device.type == "cpu"
    if not select_rows:
        row_max, row_min = _row_extremes(qh, kh, scale)
        return torch.where(rows, row_max - row_min, 0.0)  # not 0 * span: a span may be inf in float16
    b, h, nq, _ = qh.shape
    span = torch.zeros(b, h, nq, dtype=torch.float32, device=qh.device)
    index = rows.nonzero().flatten()
    row_max, row_min = _row_extremes(qh.index_select(2, index), kh, scale)
    span[:, :, index] = row_max - row_min
    return span


def _densediffusion(q, k, v, heads, key_vector, weight, area_scale, mask_tokens, area=None):
    """DenseDiffusion's modulation through one fused attention call, no [Nq, Nk] tensor kept.

    On a modulated row i (s_i = w(1 - s*area) on foreground rows, 0 elsewhere), with
    R[i, j] = m_i * r_j (r = the class-token indicator for cross, the mask for self):
      L'_i = L_i + s_i [R_i (max_i - L_i) + (1 - R_i)(min_i - L_i)]
           = (1 - s_i) L_i + s_i (max_i - min_i) R_i + s_i min_i.
    The last term is constant along the row, so softmax ignores it. What is left is q_i
    scaled by (1 - s_i) plus a rank-1 bias, applied exactly by appending one dimension to
    q and k (and a zero one to v) while keeping the original 1/sqrt(d) scale.
    """
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    b, h, nq, d = qh.shape
    scale = 1.0 / math.sqrt(d)
    strength = densediffusion_strength(weight, area_scale, mask_tokens, area)
    rows = mask_tokens > 0.5
    s_rows = strength * rows.float()  # [Nq]
    bias_scale = strength * _foreground_span(qh, kh, scale, rows)  # [B, heads, Nq]: coefficient of R_i
    q_ext = torch.cat([qh * (1.0 - s_rows).to(qh.dtype)[:, None],
                       (bias_scale / scale).to(qh.dtype)[..., None]], dim=-1)
    k_ext = torch.cat([kh, key_vector.to(kh.dtype).view(1, 1, -1, 1).expand(b, h, -1, 1)], dim=-1)
    v_ext = torch.cat([vh, vh.new_zeros(b, h, vh.shape[2], 1)], dim=-1)
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=scale)[..., :d]
    return _merge_heads(out)


def injected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, kind: str,
                       mask_tokens: torch.Tensor, token_positions: Sequence[int] = (), mode: str = "additive",
                       weight: float = 1.0, area_scale: float = 1.0,
                       apply_to: Optional[torch.Tensor] = None, area: Optional[float] = None) -> torch.Tensor:
    """Attention over projected q, k, v [B, N, heads*d] with the mask injected.

    `apply_to` is a bool [B] choosing the batch rows to modulate (the conditional half
    under CFG); other rows get plain attention. `area`, the foreground fraction of
    mask_tokens, may be given by a caller that has it on the CPU (saves device reads).
    Returns [B, Nq, heads*d].
    """
    if mode not in MODES:
        raise G4SegError(f"EMI mode {mode!r}: choose one of {MODES}")
    if q.shape[-1] % heads:
        raise G4SegError(f"query width {q.shape[-1]} is not divisible by {heads} heads")
    nq, nk = q.shape[1], k.shape[1]
    if mask_tokens.numel() != nq:
        raise G4SegError(f"mask has {mask_tokens.numel()} tokens but the attention has {nq} queries")
    mask_tokens = mask_tokens.to(device=q.device, dtype=torch.float32)
    if area is None:
        area = float(mask_tokens.mean())  # tokens are 0/1 (mask_to_tokens): no foreground <=> area 0
    if mode == "off" or weight == 0 or area <= 0:
        return plain_attention(q, k, v, heads)

    def modulated(qs, ks, vs):
        if mode == "additive":
            if kind == "cross":
                bias = cross_attention_bias(mask_tokens, token_positions, nk, weight)
            elif kind == "self":
                bias = self_attention_bias(mask_tokens, weight)
            else:
                raise G4SegError(f"attention kind {kind!r}: use 'self' or 'cross'")
            return _additive(qs, ks, vs, heads, bias)
        return _densediffusion(qs, ks, vs, heads, _key_vector(kind, mask_tokens, token_positions, nk),
                               weight, area_scale, mask_tokens, area)

    if apply_to is None:
        return modulated(q, k, v)
    rows = apply_to.to(device=q.device, dtype=torch.bool)
    if not bool(rows.any()):
        return plain_attention(q, k, v, heads)
    if bool(rows.all()):
        return modulated(q, k, v)
    out = torch.empty_like(q)
    out[rows] = modulated(q[rows], k[rows], v[rows])
    out[~rows] = plain_attention(q[~rows], k[~rows], v[~rows], heads)
    return out


@dataclass
class InjectionSettings:
    """Everything a patched attention layer needs, shared by all layers of one model."""

    mask: torch.Tensor  # [H, W] probabilities (any resolution; resized per block)
    token_positions: Sequence[int]
    mode: str = "densediffusion"
    cross_weight: float = 1.0
    self_weight: float = 0.3
    area_scale: float = 1.0
    schedule: str = "constant"
    _tokens: Dict[Tuple[int, int, str], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise G4SegError(f"EMI mode {self.mode!r}: choose one of {MODES}")
        if not torch.isfinite(self.mask).all():
            raise G4SegError("the injection mask contains NaN or infinite values: clean the mask first")

    @classmethod
    def from_config(cls, mask: torch.Tensor, token_positions: Sequence[int], config) -> "InjectionSettings":
        """The injection knobs of a G4SegConfig (emi_mode, weights, area scale, schedule) for one mask."""
        return cls(mask, list(token_positions), mode=config.emi_mode, cross_weight=config.cross_weight,
                   self_weight=config.self_weight, area_scale=config.area_scale, schedule=config.emi_schedule)

    def weights_at(self, timestep: float) -> Tuple[float, float]:
        factor = emi_time_factor(self.schedule, timestep)
        return self.cross_weight * factor, self.self_weight * factor

    def tokens_for(self, num_tokens: int, latent_h: int, latent_w: int, device=None) -> torch.Tensor:
        gh, gw = grid_for_tokens(num_tokens, latent_h, latent_w)
        return self.tokens_for_grid(gh, gw, device)

    def tokens_for_grid(self, gh: int, gw: int, device=None) -> torch.Tensor:
        key = (gh, gw, str(device))
        if key not in self._tokens:
            self._tokens[key] = mask_to_tokens(self.mask.float().cpu(), gh, gw).to(device)
        return self._tokens[key]

    def area_for_grid(self, gh: int, gw: int) -> float:
        """Foreground fraction of the tokens at this grid, read on the CPU once (no device sync per layer)."""
        return float(self.tokens_for_grid(gh, gw, device="cpu").mean())

    def attention(self, q, k, v, heads: int, *, kind: str, timestep: float, mask_tokens: torch.Tensor,
                  apply_to: Optional[torch.Tensor] = None, area: Optional[float] = None) -> torch.Tensor:
        cross_w, self_w = self.weights_at(timestep)
        return injected_attention(q, k, v, heads, kind=kind, mask_tokens=mask_tokens,
                                  token_positions=self.token_positions, mode=self.mode,
                                  weight=cross_w if kind == "cross" else self_w,
                                  area_scale=self.area_scale, apply_to=apply_to, area=area)
