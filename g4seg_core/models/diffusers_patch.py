"""Mask injection into a diffusers UNet: an attention processor per attention layer.

All math lives in `injection.py`; this module only adapts diffusers' Attention modules
(project q/k/v, call the shared function, project out) and installs/restores processors.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import torch

from ..errors import G4SegError
from ..method.injection import InjectionBatch, InjectionSettings, grid_for_tokens


@dataclass
class InjectionState:
    """What changes per UNet call; shared by every processor of the UNet."""

    injection: InjectionBatch  # one mask, class tokens and knobs per image
    latent_hw: Tuple[int, int]
    timestep: float
    # Rows to modulate, host bools [B] (the cond rows under CFG, whose rows are [uncond images..., cond
    # images...]); None: every row. Row r is image r % len(injection).
    apply_to: Optional[Sequence[bool]] = None
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.injection, InjectionSettings):
            self.injection = InjectionBatch.from_settings([self.injection])
        if isinstance(self.apply_to, torch.Tensor):
            self.apply_to = self.apply_to.tolist()  # once, at construction: the layers read host values

    def attention(self, q, k, v, heads: int, kind: str) -> torch.Tensor:
        image_of_row, active = self._layout(q.shape[0])
        return self.injection.attention(q, k, v, heads, kind=kind, grid=grid_for_tokens(q.shape[1], *self.latent_hw),
                                        image_of_row=image_of_row, active=active, timestep=self.timestep)

    def _layout(self, rows: int) -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
        """(image of each attention row, rows to modulate): built once per call, not per layer."""
        if rows not in self._layouts:
            images = len(self.injection)
            if rows % images:
                raise G4SegError(f"{rows} attention rows do not split over {images} images")
            active = tuple(bool(a) for a in self.apply_to) if self.apply_to is not None else (True,) * rows
            self._layouts[rows] = (tuple(r % images for r in range(rows)), active)
        return self._layouts[rows]


class G4SegAttnProcessor:
    """Replaces a UNet attention processor; `kind` is 'self' (attn1) or 'cross' (attn2)."""

    def __init__(self, state: InjectionState, kind: str):
        self.state = state
        self.kind = kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if hidden_states.ndim != 3:
            raise G4SegError("G4Seg injection supports token-sequence attention only (SD1/SD2/SDXL UNets)")
        if attention_mask is not None:
            raise G4SegError("G4Seg injection does not combine with an attention mask from the caller")
        residual = hidden_states
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        out = self.state.attention(q, k, v, attn.heads, self.kind)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _kind_of(processor_name: str) -> str:
    if ".attn1." in processor_name:
        return "self"
    if ".attn2." in processor_name:
        return "cross"
    raise G4SegError(f"unexpected attention layer {processor_name!r}: not an SD UNet transformer block")


@contextlib.contextmanager
def injected(unet, state: InjectionState):
    """Install G4Seg processors on every transformer-block attention; restore on exit."""
    previous = dict(unet.attn_processors)
    unet.set_attn_processor({name: G4SegAttnProcessor(state, _kind_of(name)) for name in previous})
    try:
        yield unet
    finally:
        unet.set_attn_processor(previous)
