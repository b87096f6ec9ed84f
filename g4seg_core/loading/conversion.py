"""LDM single-file weights -> diffusers/transformers naming (diffusers' own conversion functions)."""

from __future__ import annotations

import logging
import re
from typing import Dict, List, Mapping

import torch

from ..models.components import SDComponents
from .detection import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_PREFIX,
    SDXL_TEXT1_PREFIX,
    SDXL_TEXT2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from ..models.families import scheduler_alphas_cumprod
from .state_dicts import with_prefix

log = logging.getLogger("g4seg")


def _drop_openclip_extra_layers(subset: Dict[str, torch.Tensor], prefix: str, num_layers: int,
                                keep_projection: bool) -> Dict[str, torch.Tensor]:
    """Keep the OpenCLIP layers the encoder is built with (SD2 uses 23 of 24) and the projection if used."""
    pattern = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    out = {}
    for key, value in subset.items():
        match = pattern.match(key)
        if match and int(match.group(1)) >= num_layers:
            continue
        if key == prefix + "text_projection" and not keep_projection:
            continue
        out[key] = value
    return out


def _fit_text_keys(model, converted: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map converted CLIP keys onto the model's own naming (flattened or `text_model.` wrapped)."""
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    out = {}
    for key, value in converted.items():
        if key.endswith("position_ids"):
            continue  # a non-persistent buffer in current transformers, stored by old checkpoints
        base = key[len("text_model."):] if key.startswith("text_model.") else key
        if base.startswith("text_projection"):
            out[base] = value
        else:
            out[("text_model." + base) if wrapped else base] = value
    return out


def convert_ldm_text_encoders(state_dict: Mapping[str, torch.Tensor], family: str, encoders: list) -> List[dict]:
    """LDM text-encoder weights -> transformers state dicts, one per encoder, via diffusers' converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    def openclip(model, prefix):
        layers = model.config.num_hidden_layers
        subset = _drop_openclip_extra_layers(with_prefix(state_dict, prefix), prefix, layers,
                                             keep_projection=hasattr(model, "text_projection"))
        return _fit_text_keys(model, convert_open_clip_checkpoint(model, subset, prefix=prefix))

    if family == "sd15":
        return [_fit_text_keys(encoders[0], convert_ldm_clip_checkpoint(with_prefix(state_dict, SD1_TEXT_PREFIX)))]
    if family in ("sd21", "sd21v"):
        return [openclip(encoders[0], SD2_TEXT_PREFIX)]
    return [_fit_text_keys(encoders[0], convert_ldm_clip_checkpoint(with_prefix(state_dict, SDXL_TEXT1_PREFIX))),
            openclip(encoders[1], SDXL_TEXT2_PREFIX)]


def convert_ldm_checkpoint(state_dict: Mapping[str, torch.Tensor], family: str, components: SDComponents) -> dict:
    """{"unet": sd, "vae": sd, "text_encoders": [sd, ...]} in diffusers/transformers naming."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = convert_ldm_unet_checkpoint(with_prefix(state_dict, UNET_PREFIX), dict(components.unet.config))
    vae = convert_ldm_vae_checkpoint(with_prefix(state_dict, VAE_PREFIX), dict(components.vae.config))
    texts = convert_ldm_text_encoders(state_dict, family, components.text_encoders)
    return {"unet": {k: v for k, v in unet.items() if v is not None},
            "vae": {k: v for k, v in vae.items() if v is not None}, "text_encoders": texts}


def checkpoint_schedule(state_dict: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """SD's schedule in float64; a checkpoint's own stored alphas_cumprod wins when it differs."""
    computed = scheduler_alphas_cumprod()
    stored = state_dict.get("alphas_cumprod")
    if stored is not None and stored.numel() == computed.numel():
        stored = stored.double().flatten()
        if float((stored - computed).abs().max()) > 1e-4:
            log.info("%s: using the checkpoint's own alphas_cumprod (differs from SD's scaled_linear schedule)", source)
            return stored
    return computed
