"""What a checkpoint is: its family and prediction type read from the weights, unsupported models named."""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Tuple

import torch

from ..errors import G4SegError
from ..models.families import normalize_family
from ..method.schedule import PREDICTION_TYPES

log = logging.getLogger("g4seg")


# LDM single-file prefixes.
UNET_PREFIX = "model.diffusion_model."


VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
_UNSUPPORTED_MARKERS = [
    # (substring of some key, what the file is)
    ("joint_blocks.", "a Stable Diffusion 3 / 3.5 model (MMDiT)"),
    ("double_blocks.", "a Flux model"),
    ("single_blocks.", "a Flux model"),
    ("time_stack.", "a video model (Stable Video Diffusion)"),
    ("time_mixer", "a video model (Stable Video Diffusion)"),
    ("motion_modules.", "an AnimateDiff motion module"),
    ("temporal_transformer", "a video model"),
    ("clip_txt_mapper", "a Stable Cascade model"),
    ("channelwise.", "a Stable Cascade model"),
    ("adaln_single", "a PixArt / DiT-style model"),
    ("x_embedder.", "a DiT-style transformer model (PixArt, Hunyuan-DiT, Lumina, ...)"),
    ("patchify_proj", "an LTX-Video model"),
    ("head.modulation", "a Wan video model"),
    ("lora_unet_", "a LoRA (load it on a checkpoint in ComfyUI instead)"),
    ("lora_down", "a LoRA (load it on a checkpoint in ComfyUI instead)"),
    ("control_model.", "a ControlNet"),
    ("input_hint_block", "a ControlNet"),
]
IN_CHANNEL_MODELS = {9: "an inpainting model", 8: "an InstructPix2Pix model", 5: "a depth-conditioned model",
                      7: "an x4 upscaler"}


def _unsupported(state_dict: Mapping[str, torch.Tensor], source: str) -> Optional[str]:
    keys = list(state_dict)
    for marker, what in _UNSUPPORTED_MARKERS:
        if any(marker in k for k in keys):
            return f"{source} looks like {what}, which G4Seg does not support"
    conv_in = state_dict.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        if any(k.startswith(("encoder.", "decoder.")) for k in keys) and not any("diffusion_model" in k for k in keys):
            return f"{source} looks like a VAE only, not a full checkpoint"
        if any(k.startswith(("input_blocks.", "diffusion_model.")) for k in keys):
            return (f"{source} holds a UNet only (ComfyUI models/unet style); G4Seg needs a full checkpoint "
                    "with the VAE and text encoder(s)")
        return f"{source} is not a Stable Diffusion UNet checkpoint (no {UNET_PREFIX}* keys)"
    if conv_in.ndim == 4 and conv_in.shape[1] != 4:
        what = IN_CHANNEL_MODELS.get(int(conv_in.shape[1]), f"a model with {conv_in.shape[1]} input channels")
        return f"{source} is {what}; G4Seg needs a plain text-to-image checkpoint (4 latent input channels)"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys) and \
            not any(k.startswith(SDXL_TEXT2_PREFIX) for k in keys):
        return f"{source} looks like the SDXL refiner; G4Seg needs the SDXL base model"
    return None


def detect_family(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """"sd15" | "sd21" | "sdxl" from an LDM state dict's keys; G4SegError for anything else.

    SD1.x: cond_stage_model.transformer.* (CLIP-L); SD2.x: cond_stage_model.model.* (OpenCLIP);
    SDXL: conditioner.embedders.0 (CLIP-L) and .1 (OpenCLIP bigG). Whether SD2.x is the 768-v
    model cannot be read from the key names: see `detect_prediction_type`.
    """
    reason = _unsupported(state_dict, source)
    if reason:
        raise G4SegError(reason + " (supported: SD1.x, SD2.x, SDXL base; LCM/fine-tunes of these work)")
    keys = list(state_dict)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)
    if has(SDXL_TEXT1_PREFIX) and has(SDXL_TEXT2_PREFIX):
        family = "sdxl"
    elif has(SD2_TEXT_PREFIX):
        family = "sd21"
    elif has(SD1_TEXT_PREFIX):
        family = "sd15"
    else:
        raise G4SegError(f"{source} holds no text encoder weights (cond_stage_model.* / conditioner.embedders.*): "
                         "G4Seg needs a full checkpoint with the text encoder(s) and VAE")
    if not has(VAE_PREFIX):
        raise G4SegError(f"{source} holds no VAE weights (first_stage_model.*): use a full checkpoint "
                         "(the VAE is needed to encode the image and decode the generation)")
    # Consistency check: the UNet's cross-attention width must be the text width of the family.
    for key, value in state_dict.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight"):
            context = int(value.shape[1])
            expected = {"sd15": 768, "sd21": 1024, "sdxl": 2048}[family]
            text_width = _text_width(state_dict, family)
            if context not in (expected, text_width):
                raise G4SegError(f"{source}: the UNet's cross-attention takes {context}-wide text but the "
                                 f"{family} text encoder gives {text_width}: the file mixes parts of different models")
            break
    return family


def _text_width(state_dict: Mapping[str, torch.Tensor], family: str) -> int:
    if family == "sd15":
        t = state_dict.get(SD1_TEXT_PREFIX + "text_model.embeddings.token_embedding.weight")
        return int(t.shape[1]) if t is not None else 768
    if family == "sd21":
        t = state_dict.get(SD2_TEXT_PREFIX + "token_embedding.weight")
        return int(t.shape[1]) if t is not None else 1024
    a = state_dict.get(SDXL_TEXT1_PREFIX + "text_model.embeddings.token_embedding.weight")
    b = state_dict.get(SDXL_TEXT2_PREFIX + "token_embedding.weight")
    return (int(a.shape[1]) if a is not None else 768) + (int(b.shape[1]) if b is not None else 1280)


def detect_prediction_type(state_dict: Mapping[str, torch.Tensor], family: str) -> Tuple[str, str]:
    """(prediction_type, reason). Marker keys first, then for SD2.x a weight statistic.

    ComfyUI and other trainers save an empty `v_pred` tensor in v-prediction checkpoints.
    The official SD2.x 768-v file has no marker; the test ComfyUI uses for it is kept here:
    the spread of `output_blocks.11.1.transformer_blocks.0.norm1.bias` is above 0.09 in the
    v-models and below in the eps-models. It is a heuristic: pass family="sd21v" or
    prediction_type= to override it.
    """
    if "v_pred" in state_dict:
        return "v_prediction", "the checkpoint carries a 'v_pred' marker key"
    if family in ("sd21", "sd21v"):
        bias = state_dict.get(UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if bias is not None and bias.numel() > 1:
            spread = float(bias.float().std(unbiased=False))
            if spread > 0.09:
                return "v_prediction", f"SD2.x weight statistic ({spread:.3f} > 0.09) says a 768-v model"
            return "epsilon", f"SD2.x weight statistic ({spread:.3f} <= 0.09) says an epsilon (512 base) model"
    return "epsilon", "no v-prediction marker"


def resolve_family(detected: str, family: Optional[str], prediction_type: Optional[str],
                    guessed: Tuple[str, str], source: str) -> Tuple[str, str]:
    family = normalize_family(family)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise G4SegError(f"prediction_type={prediction_type!r}: choose one of {PREDICTION_TYPES}")
    if family is not None:
        base = "sd21" if family == "sd21v" else family
        if base != detected:
            raise G4SegError(f"{source} is a {detected} checkpoint, but family={family!r} was given: "
                             f"leave family unset (detected from the weights) or give {detected!r}")
    if prediction_type is None:
        if family == "sd21v":
            prediction_type, reason = "v_prediction", "family='sd21v' was given"
        elif family == "sd21":
            prediction_type, reason = "epsilon", "family='sd21' was given"
        else:
            prediction_type, reason = guessed
    else:
        reason = "prediction_type was given"
    if detected == "sd21":
        family = "sd21v" if prediction_type == "v_prediction" else "sd21"
    else:
        family = detected
    log.info("%s: family %s, %s (%s)%s", source, family, prediction_type, reason,
             "; pass family='sd21'/'sd21v' or prediction_type= to override" if detected == "sd21" else "")
    return family, prediction_type
