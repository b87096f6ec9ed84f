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
# One q k^T pass up to this many logits (128-256 MB), query chunks beyond: bounds memory at large sizes
# (an 8 GB card at 1024x1024) while typical layers take one pass (on a 2-core CPU, 5x4096x4096 logits:
# one pass 230 ms vs 540 ms in 4M-logit chunks in bfloat16, about even in float32).
_DD_BLOCK_ELEMENTS = 1 << 26


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


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    return _merge_heads(out)


def _additive(q, k, v, heads, row_tokens, key_vectors, weights, derived: dict):
    """Eq. 5 for every row at once: bias[r, i, j] = w_r m_r[i] r_r[j] / sqrt(d), built in q's dtype (fused
    kernels add the mask after the 1/sqrt(d) scale; a float32 mask with float16 q is wrong on some backends).
    Its two factors are built once per call shape (`derived`); a layer multiplies them: one kernel, and no
    [B, Nq, Nk] bias is kept between layers."""
    d = q.shape[-1] // heads
    key = ("additive", d, q.dtype)
    if key not in derived:
        coefficient = (weights.float() / math.sqrt(d)).to(q.dtype)[:, None, None]
        derived[key] = (coefficient * row_tokens.to(q.dtype)[:, :, None], key_vectors.to(q.dtype)[:, None, :])
    query_factor, key_factor = derived[key]
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=(query_factor * key_factor)[:, None])
    return _merge_heads(out)


def _row_extremes(qh: torch.Tensor, kh: torch.Tensor, scale: float):
    """Row max and min of L = q k^T * scale, [B, heads, Nq] each, in the matmul's dtype.

    One batched q k^T when the logits fit in _DD_BLOCK_ELEMENTS (measured on the CPU: as fast as or faster
    than query chunks, and one kernel on a GPU), query chunks beyond that (bounds memory at large sizes).
    q is scaled before the matmul (the logits themselves, as SDPA computes them: unscaled q k^T can
    overflow float16), and the extremes are taken in the matmul's own dtype: a float32 copy of every logit
    costs as much as the bfloat16 matmul itself. (amax and amin, not torch.aminmax: on this project's CPU
    aminmax takes 113 ms for 5x4096x4096 logits where amax + amin take 37-39 ms.)
    """
    b, h, nq, _ = qh.shape
    nk = kh.shape[2]
    queries, keys_t = qh * scale, kh.transpose(-1, -2)
    chunk = max(1, min(nq, _DD_BLOCK_ELEMENTS // max(1, b * h * nk)))
    if chunk == nq:
        logits = torch.matmul(queries, keys_t)
        return logits.amax(dim=-1), logits.amin(dim=-1)
    row_max = torch.empty(b, h, nq, dtype=qh.dtype, device=qh.device)
    row_min = torch.empty_like(row_max)
    # Contiguous once: the head-split views would otherwise be copied by every chunk's matmul.
    queries, keys_t = queries.contiguous(), keys_t.contiguous()
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        logits = torch.matmul(queries[:, :, start:stop], keys_t)
        row_max[:, :, start:stop] = logits.amax(dim=-1)
        row_min[:, :, start:stop] = logits.amin(dim=-1)
    return row_max, row_min


def _select_rows_on(device: torch.device) -> bool:
    """Compute the span of foreground rows only? On CPUs (saves the background's share of the extra q k^T
    pass); elsewhere all rows are computed, since selecting them needs their count on the host: a sync
    per layer costs a GPU more than the rows it skips."""
    return device.type == "cpu"


def _foreground_index(rows: torch.Tensor) -> torch.Tensor:
    """Query positions that are foreground in some batch row (`rows` bool [B, Nq]); reads their count on the host."""
    return rows.any(dim=0).nonzero().flatten()


def _foreground_span(qh: torch.Tensor, kh: torch.Tensor, scale: float, rows: torch.Tensor,
                     select_rows: Optional[bool] = None, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max_i - min_i of L's rows, [B, heads, Nq] float32; 0 on background rows (`rows`: bool [B or 1, Nq]).

    Background rows are not modulated (s_i = 0), so their span is never used. `select_rows` (default
    _select_rows_on the device) computes only the query rows that are foreground in some batch row
    (`index`: those rows, when the caller has them). The difference is taken in float32 (the float16
    extremes of a wide row can differ by more than float16 holds).
    """
    if select_rows is None:
        select_rows = _select_rows_on(qh.device)
    if not select_rows:
        row_max, row_min = _row_extremes(qh, kh, scale)
        return torch.where(rows[:, None, :], row_max.float() - row_min, 0.0)  # not 0 * span: a span may be inf
    b, h, nq, _ = qh.shape
    span = torch.zeros(b, h, nq, dtype=torch.float32, device=qh.device)
    index = _foreground_index(rows) if index is None else index
    row_max, row_min = _row_extremes(qh.index_select(2, index), kh, scale)
    span[:, :, index] = torch.where(rows.expand(b, nq)[:, None, index], row_max.float() - row_min, 0.0)
    return span


def _padded_width(width: int, device: torch.device) -> int:
    """Head dimension for the fused kernel: a multiple of 8 on accelerators (flash/cuDNN SDPA need it; 65 falls
    back to the slow math kernel), unpadded on CPUs, whose fused kernel takes any width (padding there only
    adds work and changes float32 rounding)."""
    return width if device.type == "cpu" else -(-width // 8) * 8


@dataclass
class _Modulation:
    """What densediffusion's layers of one shape share, built once per call shape: small tensors (at most 8
    wide in the head dimension), so a layer launches only its own work."""

    rows: torch.Tensor  # bool [B, Nq]: the modulated query rows
    strength: torch.Tensor  # float32 [B, 1, 1]: w (1 - s*area) per batch row
    query_factor: torch.Tensor  # [B, 1, Nq, 1] in q's dtype: 1 - s_i
    query_tail: Optional[torch.Tensor]  # zeros [B, h, Nq, width - d - 1] (padding), None when unpadded
    key_tail: torch.Tensor  # [B, h, Nk, width - d]: the key indicator, then zeros
    value_tail: torch.Tensor  # zeros [B, h, Nk, width - d]
    index: Optional[torch.Tensor]  # foreground query positions (CPU path, _select_rows_on), else None

    @classmethod
    def build(cls, qh: torch.Tensor, num_keys: int, row_tokens, key_vectors, weights, area_scales) -> "_Modulation":
        b, h, nq, d = qh.shape
        area = row_tokens.mean(dim=-1).to(weights.dtype)
        # w (1 - s*area) in the weights' (wide) dtype, then float32: the numbers a host computation gave
        strength = (weights * (1.0 - area_scales * area).clamp_min(0.0)).float()  # [B]
        rows = row_tokens > 0.5
        width = _padded_width(d + 1, qh.device)
        zeros = lambda n, extra: qh.new_zeros(b, h, n, extra)  # noqa: E731
        key_column = key_vectors[:, None, :, None].expand(b, h, num_keys, 1).to(qh.dtype)
        return cls(rows=rows, strength=strength[:, None, None],
                   query_factor=(1.0 - strength[:, None] * row_tokens).to(qh.dtype)[:, None, :, None],
                   query_tail=zeros(nq, width - d - 1) if width > d + 1 else None,
                   key_tail=torch.cat([key_column, zeros(num_keys, width - d - 1)], dim=-1),
                   value_tail=zeros(num_keys, width - d),
                   index=_foreground_index(rows) if _select_rows_on(qh.device) else None)


def _densediffusion(q, k, v, heads, row_tokens, key_vectors, weights, area_scales, derived: dict):
    """DenseDiffusion's modulation through one fused attention call for every row, no [Nq, Nk] tensor kept.

    On a modulated row i of batch row r (s_ri = w_r (1 - s*area_r) m_r[i]), with R[i, j] = m_r[i] key_r[j]
    (key = the class-token indicator for cross, the mask for self):
      L'_i = L_i + s_i [R_i (max_i - L_i) + (1 - R_i)(min_i - L_i)]
           = (1 - s_i) L_i + s_i (max_i - min_i) R_i + s_i min_i.
    The last term is constant along the row, so softmax ignores it. What is left is q_i
    scaled by (1 - s_i) plus a rank-1 bias, applied exactly by appending one dimension to
    q and k (and a zero one to v) while keeping the original 1/sqrt(d) scale. The head dimension
    is padded with zeros to a multiple of 8 on accelerators so fused (flash) kernels apply (_padded_width).
    A row whose tokens are all zero (background, unmodulated, area 0) is plain attention. What depends
    only on the rows (_Modulation) is built once per call shape (`derived`) and shared by its layers.
    """
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    d = qh.shape[-1]
    key = ("densediffusion", heads, d, q.dtype, k.shape[1])
    if key not in derived:
        derived[key] = _Modulation.build(qh, k.shape[1], row_tokens, key_vectors, weights, area_scales)
    terms = derived[key]
    scale = 1.0 / math.sqrt(d)
    span = _foreground_span(qh, kh, scale, terms.rows, select_rows=terms.index is not None, index=terms.index)
    bias_scale = terms.strength * span / scale
    q_ext = torch.cat([qh * terms.query_factor, bias_scale[..., None].to(qh.dtype)]
                      + ([] if terms.query_tail is None else [terms.query_tail]), dim=-1)
    k_ext = torch.cat([kh, terms.key_tail], dim=-1)
    v_ext = torch.cat([vh, terms.value_tail], dim=-1)
    out = F.scaled_dot_product_attention(q_ext, k_ext, v_ext, scale=scale)[..., :d]
    return _merge_heads(out)


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, mode: str, kind: str,
                      row_tokens: torch.Tensor, class_keys: Optional[torch.Tensor], weights: torch.Tensor,
                      area_scales: torch.Tensor, derived: Optional[dict] = None) -> torch.Tensor:
    """Injected attention for a whole batch in one call, each row with its own mask, class tokens and weight.

    q, k, v [B, N, heads*d]; row_tokens [B, Nq] 0/1 (all zero: plain attention for that row, e.g. the
    unconditional half under CFG); class_keys [B, Nk] 0/1 class-token indicators (cross; unused for self,
    whose relation is the mask itself); weights, area_scales [B] (weight 0: plain attention; wide_dtype). All on q's
    device; nothing here reads a device value on the host. `derived`: a dict kept for every layer that gets
    these same row inputs (InjectionBatch keeps one per call shape): what depends only on them is built once
    there. Returns [B, Nq, heads*d].
    """
    if mode not in MODES:
        raise G4SegError(f"EMI mode {mode!r}: choose one of {MODES}")
    if mode == "off":
        return plain_attention(q, k, v, heads)
    if kind == "self":
        key_vectors = row_tokens
    elif kind == "cross":
        key_vectors = class_keys
    else:
        raise G4SegError(f"attention kind {kind!r}: use 'self' or 'cross'")
    derived = {} if derived is None else derived
    if mode == "additive":
        return _additive(q, k, v, heads, row_tokens, key_vectors, weights, derived)
    return _densediffusion(q, k, v, heads, row_tokens, key_vectors, weights, area_scales, derived)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the per-row knobs (weights, area scales: [B] numbers, exact as on the host) where the
    device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def class_indicator(token_positions: Sequence[int], num_keys: int) -> torch.Tensor:
    """[num_keys] float 0/1: 1 at the class tokens (checked against the number of text keys)."""
    positions = [int(p) for p in token_positions]
    if any(not 0 <= p < num_keys for p in positions):
        raise G4SegError(f"class token positions {positions} fall outside the {num_keys} text keys")
    indicator = torch.zeros(num_keys)
    indicator[positions] = 1.0
    return indicator


def injected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, kind: str,
                       mask_tokens: torch.Tensor, token_positions: Sequence[int] = (), mode: str = "additive",
                       weight: float = 1.0, area_scale: float = 1.0,
                       apply_to: Optional[torch.Tensor] = None, area: Optional[float] = None) -> torch.Tensor:
    """Attention over projected q, k, v [B, N, heads*d] with one mask [Nq] injected into every row.

    `apply_to` is a bool [B] choosing the batch rows to modulate (the conditional half under CFG);
    other rows get plain attention. (`area` is accepted for old callers; it is the tokens' mean.)
    The UNet paths use InjectionBatch (a mask per row, no host reads); this is the one-mask form.
    Returns [B, Nq, heads*d].
    """
    if mode not in MODES:
        raise G4SegError(f"EMI mode {mode!r}: choose one of {MODES}")
    if q.shape[-1] % heads:
        raise G4SegError(f"query width {q.shape[-1]} is not divisible by {heads} heads")
    b, nq, nk = q.shape[0], q.shape[1], k.shape[1]
    if mask_tokens.numel() != nq:
        raise G4SegError(f"mask has {mask_tokens.numel()} tokens but the attention has {nq} queries")
    tokens = (mask_tokens.to(device=q.device, dtype=torch.float32).flatten() > 0.5).float()
    rows = tokens[None].expand(b, nq)
    if apply_to is not None:
        rows = rows * apply_to.to(device=q.device, dtype=torch.float32)[:, None]
    class_keys = class_indicator(token_positions, nk).to(q.device)[None].expand(b, nk) if kind == "cross" else None
    full = lambda value: torch.full((b,), float(value), device=q.device, dtype=wide_dtype(q.device))  # noqa: E731
    return batched_attention(q, k, v, heads, mode=mode, kind=kind, row_tokens=rows, class_keys=class_keys,
                             weights=full(weight), area_scales=full(area_scale))


@dataclass
class InjectionSettings:
    """One image's injection: its mask, its class-token positions and the knobs (InjectionBatch batches them)."""

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


class InjectionBatch:
    """The injection of one set of images: a mask and class tokens per image, knobs per image, on the device.

    Attention row r of a call belongs to image `image_of_row[r]` and is modulated when `active[r]`
    (the conditional rows under CFG); both are host tuples the caller knows from the batch layout.
    What a layer needs (tokens at its grid, class-token indicators, weights, what batched_attention
    derives from them) is built once per call shape and cached, so the attention layers read no device
    value on the host and run one call for the whole batch (batched_attention). The flow uses a batch
    for one UNet call; in ComfyUI one lives as long as the patched MODEL, over every sampler step, so
    the per-row inputs of earlier timesteps are dropped when the timestep changes (row_inputs).
    """

    def __init__(self, masks, token_positions: Sequence[Sequence[int]], *, modes: Sequence[str],
                 cross_weights: Sequence[float], self_weights: Sequence[float], area_scales: Sequence[float],
                 schedules: Sequence[str]):
        count = len(token_positions)
        if count == 0 or not all(len(x) == count for x in (masks, modes, cross_weights, self_weights,
                                                             area_scales, schedules)):
            raise G4SegError("an injection batch needs one mask, token positions and knobs per image, at least one")
        used = {m for m in modes if m != "off"}
        for m in modes:
            if m not in MODES:
                raise G4SegError(f"EMI mode {m!r}: choose one of {MODES}")
        if len(used) > 1:
            raise G4SegError(f"one UNet call injects with one EMI mode, this batch mixes {sorted(used)}: "
                             "refine them in separate batches")
        self.mode = used.pop() if used else "off"
        # A mask per image: one stacked tensor when the sizes agree (the flow's case), else a list.
        same = isinstance(masks, torch.Tensor) or len({tuple(m.shape) for m in masks}) == 1
        self.masks = masks if isinstance(masks, torch.Tensor) else (torch.stack(list(masks)) if same else list(masks))
        self.token_positions = [list(p) for p in token_positions]
        self.modes, self.schedules = list(modes), list(schedules)
        self.cross_weights, self.self_weights = [float(w) for w in cross_weights], [float(w) for w in self_weights]
        self.area_scales = [float(a) for a in area_scales]
        self._cache: Dict[tuple, object] = {}

    def __len__(self) -> int:
        return len(self.token_positions)

    @classmethod
    def from_settings(cls, settings: Sequence[InjectionSettings]) -> "InjectionBatch":
        settings = list(settings)
        return cls([s.mask.float() for s in settings], [s.token_positions for s in settings],
                   modes=[s.mode for s in settings], cross_weights=[s.cross_weight for s in settings],
                   self_weights=[s.self_weight for s in settings], area_scales=[s.area_scale for s in settings],
                   schedules=[s.schedule for s in settings])

    @classmethod
    def from_config(cls, masks: torch.Tensor, token_positions: Sequence[Sequence[int]], config) -> "InjectionBatch":
        """Masks [B, H, W] (any device; checked by the caller) with one G4SegConfig's knobs for every image."""
        n = len(token_positions)
        return cls(masks, token_positions, modes=[config.emi_mode] * n, cross_weights=[config.cross_weight] * n,
                   self_weights=[config.self_weight] * n, area_scales=[config.area_scale] * n,
                   schedules=[config.emi_schedule] * n)

    def select(self, images: Sequence[int]) -> "InjectionBatch":
        """The batch of these images only (in this order)."""
        images = [int(i) for i in images]
        pick = lambda values: [values[i] for i in images]  # noqa: E731
        masks = self.masks[images] if isinstance(self.masks, torch.Tensor) else pick(self.masks)
        return InjectionBatch(masks, pick(self.token_positions), modes=pick(self.modes),
                              cross_weights=pick(self.cross_weights), self_weights=pick(self.self_weights),
                              area_scales=pick(self.area_scales), schedules=pick(self.schedules))

    @property
    def active(self) -> bool:
        return self.mode != "off"

    def _tokens(self, gh: int, gw: int, device) -> torch.Tensor:
        """[images, gh*gw] 0/1 float on `device`: area average to the grid, then >= 0.5 (SPEC step 4)."""
        key = ("tokens", gh, gw, str(device))
        if key not in self._cache:
            if isinstance(self.masks, torch.Tensor):
                masks = self.masks.to(device=device, dtype=torch.float32)
                small = F.interpolate(masks[:, None], size=(gh, gw), mode="area")[:, 0]
                self._cache[key] = (small >= 0.5).float().flatten(1)
            else:
                self._cache[key] = torch.stack([mask_to_tokens(m.to(device), gh, gw) for m in self.masks])
        return self._cache[key]

    def _class_keys(self, num_keys: int, device) -> torch.Tensor:
        key = ("class", num_keys, str(device))
        if key not in self._cache:
            self._cache[key] = torch.stack([class_indicator(p, num_keys) for p in self.token_positions]).to(device)
        return self._cache[key]

    def row_inputs(self, kind: str, grid: Tuple[int, int], num_keys: int, image_of_row: Tuple[int, ...],
                   active: Tuple[bool, ...], timestep: float, device):
        """(row_tokens [R, Nq], class_keys [R, Nk] or None, weights [R], area_scales [R], derived) for
        batched_attention; `derived` is the dict its layers share for what they build from these inputs."""
        key = ("rows", kind, tuple(grid), num_keys, image_of_row, active, float(timestep), str(device))
        if key not in self._cache:
            # A sampler visits each timestep once: what other timesteps built (a few MB per step on a GPU) goes.
            for old in [k for k in self._cache if k[0] == "rows" and k[6] != key[6]]:
                del self._cache[old]
            if kind not in ("self", "cross"):
                raise G4SegError(f"attention kind {kind!r}: use 'self' or 'cross'")
            if any(not 0 <= i < len(self) for i in image_of_row):
                raise G4SegError(f"attention rows refer to images {sorted(set(image_of_row))}, "
                                 f"the injection has {len(self)}")
            index = torch.tensor(image_of_row, dtype=torch.long)
            weights = []
            for i, on in zip(image_of_row, active):
                factor = emi_time_factor(self.schedules[i], timestep)
                w = self.cross_weights[i] if kind == "cross" else self.self_weights[i]
                weights.append(w * factor if on and self.modes[i] != "off" else 0.0)
            on_rows = torch.tensor([float(w != 0.0) for w in weights])
            tokens = self._tokens(*grid, device).index_select(0, index.to(device)) * on_rows.to(device)[:, None]
            classes = (self._class_keys(num_keys, device).index_select(0, index.to(device))
                       if kind == "cross" else None)
            wide = wide_dtype(torch.device(device))
            self._cache[key] = (tokens, classes, torch.tensor(weights, dtype=wide).to(device),
                                torch.tensor([self.area_scales[i] for i in image_of_row], dtype=wide).to(device), {})
        return self._cache[key]

    def attention(self, q, k, v, heads: int, *, kind: str, grid: Tuple[int, int], image_of_row: Tuple[int, ...],
                  active: Tuple[bool, ...], timestep: float = 0.0) -> torch.Tensor:
        """One batched_attention call over all rows of q, k, v [R, N, heads*d]."""
        if q.shape[-1] % heads:
            raise G4SegError(f"query width {q.shape[-1]} is not divisible by {heads} heads")
        if len(image_of_row) != q.shape[0] or len(active) != q.shape[0]:
            raise G4SegError(f"{q.shape[0]} attention rows but {len(image_of_row)} image indices")
        if grid[0] * grid[1] != q.shape[1]:
            raise G4SegError(f"a {grid[0]}x{grid[1]} token grid does not hold {q.shape[1]} queries")
        if self.mode == "off" or not any(active):
            return plain_attention(q, k, v, heads)
        tokens, classes, weights, area_scales, derived = self.row_inputs(kind, grid, k.shape[1], tuple(image_of_row),
                                                                         tuple(active), timestep, q.device)
        return batched_attention(q, k, v, heads, mode=self.mode, kind=kind, row_tokens=tokens, class_keys=classes,
                                 weights=weights, area_scales=area_scales, derived=derived)
