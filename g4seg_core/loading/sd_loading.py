"""SD checkpoints -> SDComponents, offline.

Two layouts are read:
  * a diffusers folder (model_index.json, unet/, vae/, text_encoder/[, text_encoder_2/],
    scheduler/): each model with `from_pretrained(local folder, local_files_only=True)`;
  * a single-file LDM checkpoint (`.safetensors`, or `.ckpt` read with
    `torch.load(weights_only=True)`) as kept in ComfyUI's models/checkpoints: the family is
    detected from the state-dict keys, the models are built from the architecture configs
    shipped in `g4seg_core/configs/` (no hub config is ever fetched), and the weights are
    converted with diffusers' own single-file conversion functions, then loaded with
    strict key and shape checks.

The tokenizer is always ours (`tokenizer.G4SegTokenizer`, open_clip's installed BPE
vocabulary), so no tokenizer files are needed either. Nothing here touches the network:
every path is local and every `from_pretrained` call passes `local_files_only=True`. (The `g4seg`
command also sets HF_HUB_OFFLINE for its own process; a library import does not change the
environment of the program that imports it.)

The families ("sd15", "sd21", "sd21v", "sdxl") are described in families.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ..models.components import SDComponents, components_from_configs
from .conversion import checkpoint_schedule, convert_ldm_checkpoint
from .detection import (
    UNET_PREFIX,
    VAE_PREFIX,
    IN_CHANNEL_MODELS,
    resolve_family,
    detect_family,
    detect_prediction_type,
)
from ..errors import G4SegError
from ..models.families import FAMILIES, family_configs, load_config, scheduler_alphas_cumprod
from .state_dicts import assign_weights, with_prefix, unconverted_keys, load_state_dict_file
from ..models.tokenizer import G4SegTokenizer


def load_single_file(path: Union[str, Path], family: Optional[str] = None, dtype: torch.dtype = torch.float32,
                     device="cpu", prediction_type: Optional[str] = None,
                     configs: Optional[Mapping] = None) -> SDComponents:
    """An LDM-format single-file checkpoint -> SDComponents (see the module docstring).

    `configs` overrides the shipped architecture configs ({"unet", "vae", "text_encoders"}),
    for checkpoints of a non-standard size (the tests use tiny ones).
    """
    path = Path(path)
    source = path.name
    state_dict = load_state_dict_file(path)
    detected = detect_family(state_dict, source)
    family, prediction_type = resolve_family(detected, family, prediction_type,
                                              detect_prediction_type(state_dict, detected), source)
    configs = configs if configs is not None else family_configs(family)
    components = components_from_configs(configs, family, prediction_type, empty=True,
                                         alphas_cumprod=checkpoint_schedule(state_dict, source), files=[path])
    converted = convert_ldm_checkpoint(state_dict, family, components)
    leftovers = {part: unconverted_keys(with_prefix(state_dict, prefix), converted[part])
                 for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX))}
    del state_dict
    hint = (f"the {family} architecture comes from g4seg_core/configs ({FAMILIES[family]['unet']}, "
            f"{FAMILIES[family]['vae']}, {', '.join(FAMILIES[family]['text'])}); is the file complete and an "
            "unmodified SD1.x / SD2.x / SDXL-base checkpoint?")
    assign_weights(components.unet, converted["unet"], "UNet", source, hint, unconverted=leftovers["unet"])
    assign_weights(components.vae, converted["vae"], "VAE", source, hint, unconverted=leftovers["vae"])
    for i, (encoder, weights) in enumerate(zip(components.text_encoders, converted["text_encoders"])):
        assign_weights(encoder, weights, f"text encoder {i + 1}", source, hint)
    return components.to(device, _dtype_for(dtype, family))


def _variant(folder: Path, stem: str) -> Optional[str]:
    """'fp16' when a folder only has `<stem>.fp16.safetensors`-style weights (diffusers variants)."""
    if any((folder / f"{stem}{ext}").is_file() for ext in (".safetensors", ".bin")):
        return None
    if any(folder.glob(f"{stem}.fp16.*")):
        return "fp16"
    return None


def load_diffusers_folder(path: Union[str, Path], family: Optional[str] = None, dtype: torch.dtype = torch.float32,
                          device="cpu", prediction_type: Optional[str] = None) -> SDComponents:
    """A diffusers-layout folder -> SDComponents (our tokenizer; the folder's tokenizer files are not needed)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    root = Path(path)
    source = root.name
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            raise G4SegError(f"{root} is not a complete diffusers folder: {sub}/config.json is missing "
                             "(expected model_index.json, unet/, vae/, text_encoder/, scheduler/)")
    try:
        # the fast (no random init) path needs accelerate; without it diffusers only warns, so ask for it
        # only when it can work
        fast = is_accelerate_available()
        unet = UNet2DConditionModel.from_pretrained(str(root / "unet"), local_files_only=True, low_cpu_mem_usage=fast,
                                                    variant=_variant(root / "unet", "diffusion_pytorch_model"))
        vae = AutoencoderKL.from_pretrained(str(root / "vae"), local_files_only=True, low_cpu_mem_usage=fast,
                                            variant=_variant(root / "vae", "diffusion_pytorch_model"))
        encoders = [CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True,
                                                  variant=_variant(root / "text_encoder", "model"))]
        if (root / "text_encoder_2" / "config.json").is_file():
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                str(root / "text_encoder_2"), local_files_only=True, variant=_variant(root / "text_encoder_2", "model")))
    except (OSError, ValueError, RuntimeError) as exc:
        raise G4SegError(f"could not load the diffusers folder {root}: {str(exc)[:400]}") from exc

    if unet.config.in_channels != 4:
        raise G4SegError(f"{source}: the UNet takes {unet.config.in_channels} input channels "
                         f"({IN_CHANNEL_MODELS.get(unet.config.in_channels, 'not a text-to-image model')}); "
                         "G4Seg needs a plain text-to-image model")
    context = unet.config.cross_attention_dim
    if unet.config.addition_embed_type == "text_time":
        detected = "sdxl"
        if len(encoders) != 2:
            raise G4SegError(f"{source}: an SDXL UNet needs text_encoder and text_encoder_2 (the refiner is not supported)")
    elif context == 768:
        detected = "sd15"
    elif context == 1024:
        detected = "sd21"
    elif getattr(encoders[0].config, "hidden_act", "") in ("quick_gelu", "gelu"):
        # Not a released width (small test models): SD1's OpenAI CLIP-L uses QuickGELU, SD2's OpenCLIP GELU.
        detected = "sd15" if encoders[0].config.hidden_act == "quick_gelu" else "sd21"
    else:
        raise G4SegError(f"{source}: a UNet with {context}-wide cross-attention is not SD1.x (768), SD2.x (1024) "
                         "or SDXL (2048 + text_time)")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    guessed = (scheduler.get("prediction_type", "epsilon"), "scheduler_config.json says so"
               if "prediction_type" in scheduler else "no scheduler config, assumed")
    family, prediction_type = resolve_family(detected, family, prediction_type, guessed, source)

    text_layers = list(FAMILIES[family]["text_layers"])
    if family in ("sd21", "sd21v") and encoders[0].config.num_hidden_layers == 24:
        text_layers = ["penultimate_norm"]  # a full 24-layer OpenCLIP-H: take SD2's penultimate layer
    files = [str(root)]
    components = SDComponents(unet=unet, vae=vae, text_encoders=encoders,
                              tokenizer=G4SegTokenizer(FAMILIES[family]["pads"][0]), family=family,
                              prediction_type=prediction_type, alphas_cumprod=scheduler_alphas_cumprod(scheduler or None),
                              vae_scaling_factor=float(vae.config.scaling_factor), files=files, text_layers=text_layers)
    return components.to(device, _dtype_for(dtype, family))


def _dtype_for(dtype, family: str) -> torch.dtype:
    return dtype(family) if callable(dtype) else dtype


def load_sd_components(path: Union[str, Path], family: Optional[str] = None, dtype=torch.float32,
                       device="cpu", prediction_type: Optional[str] = None,
                       configs: Optional[Mapping] = None) -> SDComponents:
    """Load SD components from a diffusers folder or a single .safetensors/.ckpt file; never downloads.

    dtype: a torch dtype, or a function of the detected family returning one (the weights are cast
    once, from the file's own dtype, after the family is known).

    family: None (detected), or "sd15" / "sd21" / "sd21v" / "sdxl". SD2.x's v-prediction
    cannot always be read from the weights: give family="sd21v" (or prediction_type=
    "v_prediction") for the 768-v model when the detection (logged) is wrong.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise G4SegError(f"checkpoint {path} does not exist: give a .safetensors/.ckpt file or a diffusers folder")
    if path.is_dir():
        if configs is not None:
            raise G4SegError("configs= only applies to single-file checkpoints; a diffusers folder has its own configs")
        return load_diffusers_folder(path, family, dtype, device, prediction_type)
    return load_single_file(path, family, dtype, device, prediction_type, configs)


def save_diffusers_folder(components: SDComponents, folder: Union[str, Path]) -> Path:
    """Write components as a diffusers folder that `load_sd_components` reads back.

    No tokenizer files are written (G4Seg's tokenizer needs none), so diffusers' own
    pipelines cannot open the folder without adding them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.unet.save_pretrained(str(folder / "unet"))
    components.vae.save_pretrained(str(folder / "vae"))
    names = ["text_encoder", "text_encoder_2"]
    for name, encoder in zip(names, components.text_encoders):
        encoder.save_pretrained(str(folder / name))
    scheduler = dict(load_config("scheduler.json"), prediction_type=components.prediction_type,
                     _class_name="DDIMScheduler")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionXLPipeline" if components.family == "sdxl" else "StableDiffusionPipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if len(components.text_encoders) > 1:
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
