"""Model families (SD1.x, SD2.x eps/v, SDXL): shipped architecture configs and the noise schedule.

Families: "sd15" (SD1.x, CLIP ViT-L/14 text, context 768), "sd21" (SD2.x 512 base,
OpenCLIP ViT-H/14 text, context 1024, epsilon), "sd21v" (SD2.x 768-v: same weights
layout, v_prediction), "sdxl" (SDXL base: CLIP-L + OpenCLIP bigG, context 2048).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from ..errors import G4SegError
from ..method.schedule import scaled_linear_alphas_cumprod
from .tokenizer import END_TOKEN
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# Per family: shipped configs, how the prompt is encoded, the tokenizer padding of each
# text encoder and the prediction type.
#   text_layers: "last" = last_hidden_state (after the final layer norm);
#                "penultimate" = hidden_states[-2], no final norm (SDXL);
#                "penultimate_norm" = hidden_states[-2] then the final norm (SD2 when the
#                encoder was built with all 24 OpenCLIP layers; the shipped SD2 config has
#                23 layers, so "last" is already SD2's penultimate-then-norm).
FAMILIES: Dict[str, dict] = {
    "sd15": dict(unet="unet_sd15.json", vae="vae_sd.json", text=["text_clip_l.json"],
                 text_layers=["last"], pads=[END_TOKEN], prediction_type="epsilon"),
    "sd21": dict(unet="unet_sd21.json", vae="vae_sd.json", text=["text_openclip_h.json"],
                 text_layers=["last"], pads=[0], prediction_type="epsilon"),
    "sd21v": dict(unet="unet_sd21v.json", vae="vae_sd.json", text=["text_openclip_h.json"],
                  text_layers=["last"], pads=[0], prediction_type="v_prediction"),
    "sdxl": dict(unet="unet_sdxl.json", vae="vae_sdxl.json", text=["text_clip_l.json", "text_openclip_bigg.json"],
                 text_layers=["penultimate", "penultimate"], pads=[END_TOKEN, 0], prediction_type="epsilon"),
}


FAMILY_ALIASES = {
    "sd15": "sd15", "sd1": "sd15", "sd1.5": "sd15", "sd1x": "sd15", "sd1.x": "sd15", "v1": "sd15",
    "sd21": "sd21", "sd2": "sd21", "sd2.1": "sd21", "sd2x": "sd21", "sd2.x": "sd21", "v2": "sd21",
    "sd21v": "sd21v", "sd2v": "sd21v", "sd21-v": "sd21v", "sd2.1-v": "sd21v", "sd21-768": "sd21v",
    "sdxl": "sdxl", "xl": "sdxl", "sdxl-base": "sdxl",
}
TEXT_LAYER_MODES = ("last", "penultimate", "penultimate_norm")


def normalize_family(family: Optional[str]) -> Optional[str]:
    if family is None:
        return None
    key = str(family).strip().lower().replace("_", "")
    if key not in FAMILY_ALIASES:
        raise G4SegError(f"family={family!r} is not supported: choose one of {sorted(FAMILIES)} "
                         "(SD1.x, SD2.x 512 eps, SD2.x 768 v-prediction, SDXL base)")
    return FAMILY_ALIASES[key]


def load_config(name: str) -> dict:
    """A shipped architecture config (g4seg_core/configs/NAME), without the "_comment" keys."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise G4SegError(f"shipped config {path} is missing: reinstall ComfyUI-G4Seg / g4seg_core")
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def family_configs(family: str) -> dict:
    """{"unet": dict, "vae": dict, "text_encoders": [dict, ...]} for a family (shipped configs)."""
    spec = FAMILIES[normalize_family(family)]
    return {"unet": load_config(spec["unet"]), "vae": load_config(spec["vae"]),
            "text_encoders": [load_config(name) for name in spec["text"]]}


def scheduler_alphas_cumprod(config: Optional[Mapping] = None) -> torch.Tensor:
    """alphas_cumprod (float64 [T]) of a diffusers-style scheduler config; SD's shipped one by default."""
    config = dict(config) if config is not None else load_config("scheduler.json")
    schedule = config.get("beta_schedule", "scaled_linear")
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    if schedule == "scaled_linear":
        alphas_cumprod = scaled_linear_alphas_cumprod(start, end, steps)
    elif schedule == "linear":
        alphas_cumprod = torch.cumprod(1.0 - torch.linspace(start, end, steps, dtype=torch.float64), dim=0)
    else:
        raise G4SegError(f"scheduler beta_schedule={schedule!r} is not supported (SD1/SD2/SDXL use 'scaled_linear')")
    if config.get("rescale_betas_zero_snr"):
        raise G4SegError("zero-terminal-SNR schedules (rescale_betas_zero_snr) are not supported yet")
    return alphas_cumprod
