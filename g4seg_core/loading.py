"""Checkpoints -> diffusers components, offline.

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
every path is local and every `from_pretrained` call passes `local_files_only=True`.

Families: "sd15" (SD1.x, CLIP ViT-L/14 text, context 768), "sd21" (SD2.x 512 base,
OpenCLIP ViT-H/14 text, context 1024, epsilon), "sd21v" (SD2.x 768-v: same weights
layout, v_prediction), "sdxl" (SDXL base: CLIP-L + OpenCLIP bigG, context 2048).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

# The hub is never contacted: every from_pretrained gets a local path and local_files_only=True.
# (The `g4seg` command also sets HF_HUB_OFFLINE for its own process; a library import does not
# change the environment of the program that imports it.)

import torch

from .errors import G4SegError
from .schedule import PREDICTION_TYPES, scaled_linear_alphas_cumprod
from .tokenizer import END_TOKEN, G4SegTokenizer

log = logging.getLogger("g4seg")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Per family: shipped configs, how the prompt is encoded, the tokenizer padding of each
# text encoder, the prediction type and the native resolution.
#   text_layers: "last" = last_hidden_state (after the final layer norm);
#                "penultimate" = hidden_states[-2], no final norm (SDXL);
#                "penultimate_norm" = hidden_states[-2] then the final norm (SD2 when the
#                encoder was built with all 24 OpenCLIP layers; the shipped SD2 config has
#                23 layers, so "last" is already SD2's penultimate-then-norm).
FAMILIES: Dict[str, dict] = {
    "sd15": dict(unet="unet_sd15.json", vae="vae_sd.json", text=["text_clip_l.json"],
                 text_layers=["last"], pads=[END_TOKEN], prediction_type="epsilon", size=512),
    "sd21": dict(unet="unet_sd21.json", vae="vae_sd.json", text=["text_openclip_h.json"],
                 text_layers=["last"], pads=[0], prediction_type="epsilon", size=512),
    "sd21v": dict(unet="unet_sd21v.json", vae="vae_sd.json", text=["text_openclip_h.json"],
                  text_layers=["last"], pads=[0], prediction_type="v_prediction", size=768),
    "sdxl": dict(unet="unet_sdxl.json", vae="vae_sdxl.json", text=["text_clip_l.json", "text_openclip_bigg.json"],
                 text_layers=["penultimate", "penultimate"], pads=[END_TOKEN, 0], prediction_type="epsilon",
                 size=1024),
}
FAMILY_ALIASES = {
    "sd15": "sd15", "sd1": "sd15", "sd1.5": "sd15", "sd1x": "sd15", "sd1.x": "sd15", "v1": "sd15",
    "sd21": "sd21", "sd2": "sd21", "sd2.1": "sd21", "sd2x": "sd21", "sd2.x": "sd21", "v2": "sd21",
    "sd21v": "sd21v", "sd2v": "sd21v", "sd21-v": "sd21v", "sd2.1-v": "sd21v", "sd21-768": "sd21v",
    "sdxl": "sdxl", "xl": "sdxl", "sdxl-base": "sdxl",
}
TEXT_LAYER_MODES = ("last", "penultimate", "penultimate_norm")

# LDM single-file prefixes.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."


# ---------------------------------------------------------------------------- families/configs
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


# ---------------------------------------------------------------------------- components
@dataclass
class PromptEmbedding:
    hidden_states: torch.Tensor  # [1, 77, D] context for the UNet's cross-attention
    pooled: Optional[torch.Tensor]  # [1, P] SDXL's pooled text embedding, else None
    token_ids: List[int]  # the prompt's ids, start token .. end token (unpadded); index = position


def _text_core(model):
    """The module holding embeddings/encoder/final_layer_norm (transformers >= 5.6 flattened CLIPTextModel)."""
    return getattr(model, "text_model", model)


@dataclass
class SDComponents:
    """The diffusers models of one SD checkpoint plus what G4Seg needs to drive them."""

    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoders: list  # transformers CLIPTextModel[, CLIPTextModelWithProjection]
    tokenizer: G4SegTokenizer  # the first encoder's tokenizer (pad id differs per encoder, see pad_token_ids)
    family: str  # "sd15" | "sd21" | "sd21v" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    alphas_cumprod: torch.Tensor  # float64 [1000], the training schedule
    vae_scaling_factor: float
    files: List[str] = field(default_factory=list)
    text_layers: Optional[List[str]] = None  # per encoder, see FAMILIES; family default when None
    pad_token_ids: Optional[List[int]] = None  # per encoder; family default when None

    def __post_init__(self) -> None:
        self.family = normalize_family(self.family)
        spec = FAMILIES[self.family]
        if self.prediction_type not in PREDICTION_TYPES:
            raise G4SegError(f"prediction_type={self.prediction_type!r}: choose one of {PREDICTION_TYPES}")
        self.text_encoders = list(self.text_encoders)
        self.text_layers = list(self.text_layers or spec["text_layers"])
        self.pad_token_ids = list(self.pad_token_ids or spec["pads"])
        if not (len(self.text_encoders) == len(self.text_layers) == len(self.pad_token_ids)):
            raise G4SegError(f"{self.family} needs {len(self.text_layers)} text encoder(s), got {len(self.text_encoders)}")
        bad = [m for m in self.text_layers if m not in TEXT_LAYER_MODES]
        if bad:
            raise G4SegError(f"text_layers {bad}: choose from {TEXT_LAYER_MODES}")
        self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        self.files = [str(f) for f in self.files]
        for module in [self.unet, self.vae, *self.text_encoders]:
            module.eval().requires_grad_(False)

    # ---- geometry ---------------------------------------------------------------------
    @property
    def vae_downsample(self) -> int:
        """Pixels per latent cell (8 for every real SD VAE): 2 ** (number of VAE levels - 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The resolution the family was trained at (512, 768 for SD2.x-v, 1024 for SDXL)."""
        return FAMILIES[self.family]["size"]

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ---- text ---------------------------------------------------------------------------
    def label_token_ids(self, label: str) -> List[int]:
        """Token ids of a class name, no start/end tokens (found as a sub-sequence of the prompt)."""
        return self.tokenizer.encode_words(label)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """Encode like the family's own pipeline does.

        SD1.x: last hidden state (after the final layer norm). SD2.x: penultimate OpenCLIP layer
        then the final layer norm (the shipped 23-layer encoder's last hidden state). SDXL: both
        encoders' penultimate hidden states concatenated (768 + 1280 = 2048) and the second
        encoder's projected pooled (end-token) embedding.
        """
        token_ids = self.tokenizer.prompt_ids(prompt)  # raises G4SegError past 77 tokens
        states, pooled = [], None
        for encoder, mode, pad in zip(self.text_encoders, self.text_layers, self.pad_token_ids):
            param = next(encoder.parameters())
            ids = self.tokenizer(prompt, pad_token_id=pad)[None].to(param.device)
            out = encoder(input_ids=ids, output_hidden_states=mode != "last")
            if mode == "last":
                hidden = out.last_hidden_state
            elif mode == "penultimate":
                hidden = out.hidden_states[-2]
            else:
                hidden = _text_core(encoder).final_layer_norm(out.hidden_states[-2])
            states.append(hidden)
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds  # the last encoder with a projection wins (SDXL's bigG)
        hidden_states = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        if self.family != "sdxl":
            pooled = None
        return PromptEmbedding(hidden_states=hidden_states, pooled=pooled, token_ids=token_ids)

    def unet_kwargs(self, embedding: PromptEmbedding, height: int, width: int) -> dict:
        """Extra UNet call arguments: SDXL's added_cond_kwargs (pooled text + size/crop ids), else {}.

        time_ids = [original h, original w, crop top, crop left, target h, target w]: the image is
        neither cropped nor resized as far as SDXL's micro-conditioning is concerned.
        """
        if getattr(self.unet.config, "addition_embed_type", None) != "text_time":
            return {}
        if embedding.pooled is None:
            raise G4SegError("SDXL needs the pooled text embedding: encode the prompt with SDComponents.encode_prompt")
        device, dtype = self.device, self.dtype
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        time_ids = time_ids.expand(embedding.pooled.shape[0], -1)
        return {"added_cond_kwargs": {"text_embeds": embedding.pooled.to(device, dtype), "time_ids": time_ids}}

    # ---- placement ------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SDComponents":
        """Move every model; SDXL's VAE stays fp32 when dtype is fp16.

        The SDXL VAE's activations exceed fp16's range (NaN / black decodes), which is why its
        diffusers config carries force_upcast; bf16 has fp32's range and is kept as asked.
        """
        vae_dtype = dtype
        if dtype == torch.float16 and self.family == "sdxl":
            vae_dtype = torch.float32
        # torch's own Module.to: diffusers' override warns about fp32 modules on every dtype cast
        for module, target in [(self.unet, dtype), (self.vae, vae_dtype)] + [(e, dtype) for e in self.text_encoders]:
            torch.nn.Module.to(module, device=device, dtype=target)
        return self


# ---------------------------------------------------------------------------- model building
def _split_config(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _text_class(config: Mapping):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    archs = config.get("architectures") or ["CLIPTextModel"]
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers stay on the meta device after an assign-load: rebuild them."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.device.type != "meta":
                continue
            if name == "position_ids":  # transformers CLIP: arange(num_positions)[None]
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            else:
                raise G4SegError(f"internal: buffer {name} of {type(module).__name__} was not loaded")


def build_unet(config: Mapping, empty: bool = False):
    """UNet2DConditionModel from a config dict; `empty` builds it on the meta device (no init cost)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta") if empty else contextlib.nullcontext():
        return UNet2DConditionModel.from_config(_split_config(config))


def build_vae(config: Mapping, empty: bool = False):
    from diffusers import AutoencoderKL

    with torch.device("meta") if empty else contextlib.nullcontext():
        return AutoencoderKL.from_config(_split_config(config))


def build_text_encoder(config: Mapping, empty: bool = False):
    from transformers import CLIPTextConfig

    values = _split_config(config)
    values.pop("model_type", None)
    cls = _text_class(values)
    with torch.device("meta") if empty else contextlib.nullcontext():
        return cls(CLIPTextConfig(**values))


def components_from_configs(configs: Mapping, family: str, prediction_type: Optional[str] = None,
                            empty: bool = False, alphas_cumprod: Optional[torch.Tensor] = None,
                            files: Sequence = ()) -> SDComponents:
    """Build SDComponents from config dicts {"unet", "vae", "text_encoders": [...]}.

    empty=False initialises random weights (tiny models, benchmarks); empty=True leaves the
    weights on the meta device for a checkpoint to be assigned into (see `_assign_weights`).
    """
    family = normalize_family(family)
    unet = build_unet(configs["unet"], empty)
    vae = build_vae(configs["vae"], empty)
    encoders = [build_text_encoder(c, empty) for c in configs["text_encoders"]]
    return SDComponents(unet=unet, vae=vae, text_encoders=encoders, tokenizer=G4SegTokenizer(FAMILIES[family]["pads"][0]),
                        family=family, prediction_type=prediction_type or FAMILIES[family]["prediction_type"],
                        alphas_cumprod=scheduler_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod,
                        vae_scaling_factor=float(configs["vae"].get("scaling_factor", 0.18215)), files=list(files))


def random_components(family: str = "sd21") -> SDComponents:
    """Full-size architecture of a family with random weights (benchmarks: speed and memory only)."""
    return components_from_configs(family_configs(family), family)


# ---------------------------------------------------------------------------- state dicts
def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled checkpoint read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise G4SegError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise G4SegError(f"{path.name}: unknown weights format {suffix!r}; use .safetensors, .ckpt, .pt, .pth or .bin")
    except G4SegError:
        raise
    except Exception as exc:  # corrupt file, or a pickle holding more than tensors
        raise G4SegError(f"could not read {path}: {type(exc).__name__}: {str(exc)[:300]}. If it is an old .ckpt "
                         "holding training objects, convert it to .safetensors (weights only are ever loaded)") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        extra = {k: v for k, v in data.items() if k != "state_dict" and isinstance(v, torch.Tensor)}
        data = {**data["state_dict"], **extra}
    if not isinstance(data, Mapping):
        raise G4SegError(f"{path.name} does not hold a state dict (got {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _subset(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def _format_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _unconverted(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> List[str]:
    """Source keys whose tensors no converted entry came from (diffusers' converters drop unknown keys).

    The UNet and VAE converters pass tensors through (or as views), so storage identity tells
    which source tensors were used.
    """
    def ident(t):
        return (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else None

    used = {ident(t) for t in converted.values()}
    harmless = (".loss.", "model_ema")  # training-only tensors some old .ckpt files still carry
    return sorted(k for k, t in source.items() if ident(t) is not None and ident(t) not in used
                  and ident(t)[0] != 0 and not any(h in k for h in harmless))


def _assign_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str, source: str,
                    hint: str = "", assign: bool = True, unconverted: Sequence[str] = ()) -> None:
    """Strict load: every parameter present, nothing extra, every shape right, else G4SegError.

    1x1 conv weights and linear weights are interchangeable (SD1 uses convs for the
    transformer's proj_in/out, SD2 linears; some files store the other form).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) + list(unconverted)
    wrong = []
    for key in sorted(set(expected) & set(state_dict)):
        want, got = tuple(expected[key].shape), state_dict[key]
        if tuple(got.shape) == want:
            continue
        if got.numel() == math.prod(want) and [d for d in got.shape if d != 1] == [d for d in want if d != 1]:
            state_dict[key] = got.reshape(want)
        else:
            wrong.append(f"{key} file {tuple(got.shape)} vs model {want}")
    if missing or unexpected or wrong:
        parts = [f"{source}: the {what} weights do not match the expected architecture"]
        if missing:
            parts.append(f"{len(missing)} missing: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_format_keys(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: {_format_keys(wrong, 6)}")
        parts.append(hint or "is the file complete and a plain SD1.x / SD2.x / SDXL checkpoint?")
        raise G4SegError("; ".join(parts))
    if assign:
        # contiguous copies: converted tensors can be strided views (sliced 1x1 convs, q/k/v splits)
        for key, value in state_dict.items():
            if not value.is_contiguous():
                state_dict[key] = value.contiguous()
        model.load_state_dict(state_dict, strict=True, assign=True)
        _materialize_buffers(model)
    else:
        model.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------- detection
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

_IN_CHANNEL_MODELS = {9: "an inpainting model", 8: "an InstructPix2Pix model", 5: "a depth-conditioned model",
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
        what = _IN_CHANNEL_MODELS.get(int(conv_in.shape[1]), f"a model with {conv_in.shape[1]} input channels")
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


# ---------------------------------------------------------------------------- conversion
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
        subset = _drop_openclip_extra_layers(_subset(state_dict, prefix), prefix, layers,
                                             keep_projection=hasattr(model, "text_projection"))
        return _fit_text_keys(model, convert_open_clip_checkpoint(model, subset, prefix=prefix))

    if family == "sd15":
        return [_fit_text_keys(encoders[0], convert_ldm_clip_checkpoint(_subset(state_dict, SD1_TEXT_PREFIX)))]
    if family in ("sd21", "sd21v"):
        return [openclip(encoders[0], SD2_TEXT_PREFIX)]
    return [_fit_text_keys(encoders[0], convert_ldm_clip_checkpoint(_subset(state_dict, SDXL_TEXT1_PREFIX))),
            openclip(encoders[1], SDXL_TEXT2_PREFIX)]


def convert_ldm_checkpoint(state_dict: Mapping[str, torch.Tensor], family: str, components: SDComponents) -> dict:
    """{"unet": sd, "vae": sd, "text_encoders": [sd, ...]} in diffusers/transformers naming."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet = convert_ldm_unet_checkpoint(_subset(state_dict, UNET_PREFIX), dict(components.unet.config))
    vae = convert_ldm_vae_checkpoint(_subset(state_dict, VAE_PREFIX), dict(components.vae.config))
    texts = convert_ldm_text_encoders(state_dict, family, components.text_encoders)
    return {"unet": {k: v for k, v in unet.items() if v is not None},
            "vae": {k: v for k, v in vae.items() if v is not None}, "text_encoders": texts}


def _checkpoint_schedule(state_dict: Mapping[str, torch.Tensor], source: str) -> torch.Tensor:
    """SD's schedule in float64; a checkpoint's own stored alphas_cumprod wins when it differs."""
    computed = scheduler_alphas_cumprod()
    stored = state_dict.get("alphas_cumprod")
    if stored is not None and stored.numel() == computed.numel():
        stored = stored.double().flatten()
        if float((stored - computed).abs().max()) > 1e-4:
            log.info("%s: using the checkpoint's own alphas_cumprod (differs from SD's scaled_linear schedule)", source)
            return stored
    return computed


# ---------------------------------------------------------------------------- public loaders
def _resolve_family(detected: str, family: Optional[str], prediction_type: Optional[str],
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
    family, prediction_type = _resolve_family(detected, family, prediction_type,
                                              detect_prediction_type(state_dict, detected), source)
    configs = configs if configs is not None else family_configs(family)
    components = components_from_configs(configs, family, prediction_type, empty=True,
                                         alphas_cumprod=_checkpoint_schedule(state_dict, source), files=[path])
    converted = convert_ldm_checkpoint(state_dict, family, components)
    leftovers = {part: _unconverted(_subset(state_dict, prefix), converted[part])
                 for part, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX))}
    del state_dict
    hint = (f"the {family} architecture comes from g4seg_core/configs ({FAMILIES[family]['unet']}, "
            f"{FAMILIES[family]['vae']}, {', '.join(FAMILIES[family]['text'])}); is the file complete and an "
            "unmodified SD1.x / SD2.x / SDXL-base checkpoint?")
    _assign_weights(components.unet, converted["unet"], "UNet", source, hint, unconverted=leftovers["unet"])
    _assign_weights(components.vae, converted["vae"], "VAE", source, hint, unconverted=leftovers["vae"])
    for i, (encoder, weights) in enumerate(zip(components.text_encoders, converted["text_encoders"])):
        _assign_weights(encoder, weights, f"text encoder {i + 1}", source, hint)
    return components.to(device, dtype)


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
                         f"({_IN_CHANNEL_MODELS.get(unet.config.in_channels, 'not a text-to-image model')}); "
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
    guessed = (scheduler.get("prediction_type", "epsilon"), f"scheduler_config.json says so"
               if "prediction_type" in scheduler else "no scheduler config, assumed")
    family, prediction_type = _resolve_family(detected, family, prediction_type, guessed, source)

    text_layers = list(FAMILIES[family]["text_layers"])
    if family in ("sd21", "sd21v") and encoders[0].config.num_hidden_layers == 24:
        text_layers = ["penultimate_norm"]  # a full 24-layer OpenCLIP-H: take SD2's penultimate layer
    files = [str(root)]
    components = SDComponents(unet=unet, vae=vae, text_encoders=encoders,
                              tokenizer=G4SegTokenizer(FAMILIES[family]["pads"][0]), family=family,
                              prediction_type=prediction_type, alphas_cumprod=scheduler_alphas_cumprod(scheduler or None),
                              vae_scaling_factor=float(vae.config.scaling_factor), files=files, text_layers=text_layers)
    return components.to(device, dtype)


def load_sd_components(path: Union[str, Path], family: Optional[str] = None, dtype: torch.dtype = torch.float32,
                       device="cpu", prediction_type: Optional[str] = None,
                       configs: Optional[Mapping] = None) -> SDComponents:
    """Load SD components from a diffusers folder or a single .safetensors/.ckpt file; never downloads.

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


# ---------------------------------------------------------------------------- CLIP vision
def _heads_for_width(width: int) -> int:
    """Attention heads of a CLIP ViT, which shapes cannot tell: open_clip's head widths.

    64-wide heads except ViT-H (1280 wide, 80-wide heads) and ViT-bigG (1664, 104).
    """
    head_width = {1280: 80, 1664: 104}.get(int(width), 64)
    if width % head_width:
        raise G4SegError(f"cannot infer the number of attention heads of a {width}-wide CLIP ViT: give it by "
                         "open_clip model name, e.g. 'ViT-B-16:/path/to/weights'")
    return width // head_width


def _strip_to(state_dict: Mapping[str, torch.Tensor], anchor: str,
              companions: Sequence[str] = ()) -> Optional[Dict[str, torch.Tensor]]:
    """Keys below the prefix that precedes `anchor` (e.g. 'visual.' or 'model.visual.'), prefix removed.

    The prefix must also hold every key in `companions` (so a ResNet's inner conv1 is no match).
    """
    for key in state_dict:
        if key.endswith(anchor):
            prefix = key[: len(key) - len(anchor)]
            if all(prefix + c in state_dict for c in companions):
                return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return None


def _layer_count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in (regex.match(k) for k in keys) if m}
    return max(found) + 1 if found else 0


def _is_openai(state_dict: Mapping, path: Path) -> bool:
    """OpenAI's CLIP was trained with QuickGELU; their state dicts carry these metadata entries."""
    name = path.name.lower()
    return ("openai" in name or "quickgelu" in name
            or any(k in state_dict for k in ("input_resolution", "context_length", "vocab_size")))


def _clip_vision_transformers(vision: Dict[str, torch.Tensor], path: Path, device, dtype):
    """transformers CLIP vision weights (vision_model.*, visual_projection.weight) -> DenseCLIPFeatures."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    from .clip_features import DenseCLIPFeatures

    pre = "vision_model."
    try:
        width = int(vision[pre + "embeddings.class_embedding"].shape[0])
        patch = int(vision[pre + "embeddings.patch_embedding.weight"].shape[-1])
        positions = int(vision[pre + "embeddings.position_embedding.weight"].shape[0])
        mlp = int(vision[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise G4SegError(f"{path.name}: incomplete CLIP vision weights (missing {exc})") from exc
    grid = math.isqrt(positions - 1)
    layers = _layer_count(vision, r"vision_model\.encoder\.layers\.(\d+)\.")
    projection = vision.get("visual_projection.weight")
    name = path.name.lower()
    # Activation is not in the weights: OpenAI's ViTs (B, L: width <= 1024) use QuickGELU, LAION's
    # ViT-H / bigG (ComfyUI's clip_vision_h / clip_vision_g) use GELU; file names can say otherwise.
    quick = ("laion" not in name and "datacomp" not in name and width <= 1024) or "openai" in name
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=_heads_for_width(width), image_size=grid * patch, patch_size=patch,
                              projection_dim=int(projection.shape[0]) if projection is not None else width,
                              hidden_act="quick_gelu" if quick else "gelu", layer_norm_eps=1e-5)
    cls = CLIPVisionModelWithProjection if projection is not None else CLIPVisionModel
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    weights = {}
    for key, value in vision.items():
        if key.endswith("position_ids"):
            continue
        if key not in expected and key.startswith(pre) and key[len(pre):] in expected:
            key = key[len(pre):]  # a model class without the vision_model wrapper
        weights[key] = value
    _assign_weights(model, weights, "CLIP vision", path.name)
    desc = f"{path.name} (ViT {width}w/{layers}L/{patch}px patches, {grid * patch}px, transformers)"
    log.info("CLIP vision: %s, %s", desc, "QuickGELU" if quick else "GELU")
    return DenseCLIPFeatures.from_transformers(model, name=desc).to(device, dtype)


def _clip_vision_open_clip(visual: Dict[str, torch.Tensor], path: Path, quick: bool, device, dtype):
    """open_clip ViT weights (visual.* prefix removed) -> DenseCLIPFeatures, architecture from shapes."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    from .clip_features import DenseCLIPFeatures

    try:
        width, _, patch, _ = visual["conv1.weight"].shape
        positions = int(visual["positional_embedding"].shape[0])
        mlp = int(visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except KeyError as exc:
        raise G4SegError(f"{path.name}: not an open_clip ViT image encoder (missing {exc}); ResNet/ConvNeXt "
                         "CLIP models are not supported") from exc
    grid = math.isqrt(positions - 1)
    layers = _layer_count(visual, r"transformer\.resblocks\.(\d+)\.")
    proj = visual.get("proj")
    ratio = mlp / width
    if int(width * ratio) != mlp:  # float round-off (bigG: 8192 / 1664)
        ratio = (mlp + 0.5) / width
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = VisionTransformer(image_size=grid * patch, patch_size=int(patch), width=int(width), layers=layers,
                                  heads=_heads_for_width(int(width)), mlp_ratio=ratio,
                                  output_dim=int(proj.shape[1]) if proj is not None else int(width),
                                  act_layer=QuickGELU if quick else torch.nn.GELU)
    if proj is None:
        model.proj = None
    _assign_weights(model, dict(visual), "CLIP vision", path.name)
    desc = f"{path.name} (open_clip ViT {width}w/{layers}L/{patch}px patches, {grid * patch}px)"
    log.info("CLIP vision: %s, %s", desc, "QuickGELU" if quick else "GELU")
    return DenseCLIPFeatures.from_open_clip(model, name=desc).to(device, dtype)


def split_clip_spec(spec: Union[str, Path]) -> Tuple[Optional[str], str]:
    """'ViT-B-16:/path/w.bin' -> ('ViT-B-16', '/path/w.bin'); a plain path -> (None, path).

    A prefix counts as a model name only when it is not itself a path (Windows drive letters).
    """
    text = str(spec)
    if ":" in text and not Path(text).exists():
        name, rest = text.split(":", 1)
        if name and "/" not in name and "\\" not in name and len(name) > 1:
            return name, rest
    return None, text


def load_clip_vision(path_or_name: Union[str, Path], device="cpu", dtype: torch.dtype = torch.float32):
    """CLIP image encoder -> clip_features.DenseCLIPFeatures, from local files only.

    Accepts (a) transformers-format CLIP vision weights as kept in ComfyUI's models/clip_vision
    (keys vision_model.*, visual_projection.weight; ViT-B/L/H/bigG, 224 or 336 px inferred from
    the shapes) or a transformers folder with config.json; (b) open_clip checkpoints (visual.*
    keys or full CLIP state dicts; architecture inferred from the shapes); (c) an open_clip model
    name and a weights file, "ViT-B-16:/path/open_clip_pytorch_model.bin".
    QuickGELU vs GELU cannot be read from weights: OpenAI checkpoints (metadata keys, 'openai' in
    the file name, or a '-quickgelu' model name) use QuickGELU, others GELU.
    """
    name, file = split_clip_spec(path_or_name)
    path = Path(os.path.expanduser(file))
    if name and name.lower().startswith("hf-hub"):
        raise G4SegError("hf-hub: model names would download weights; give a local weights file instead")
    if not path.exists():
        raise G4SegError(f"CLIP image encoder weights {path} do not exist")
    if name:
        return _clip_vision_named(name, path, device, dtype)
    if path.is_dir():
        if (path / "config.json").is_file():
            from transformers import CLIPVisionModelWithProjection

            from .clip_features import DenseCLIPFeatures

            try:
                model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise G4SegError(f"could not load the CLIP vision folder {path}: {str(exc)[:300]}") from exc
            return DenseCLIPFeatures.from_transformers(model.float(), name=path.name).to(device, dtype)
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if not candidates:
            raise G4SegError(f"{path} holds no CLIP weights (config.json, *.safetensors, *.bin)")
        path = candidates[0]
    state_dict = load_state_dict_file(path)
    vision = _strip_to(state_dict, "vision_model.embeddings.class_embedding")
    if vision is not None:
        vision = {k: v for k, v in vision.items() if k.startswith(("vision_model.", "visual_projection."))}
        return _clip_vision_transformers(vision, path, device, dtype)
    visual = _strip_to(state_dict, "conv1.weight", ("positional_embedding", "class_embedding"))
    if visual is not None:
        return _clip_vision_open_clip(visual, path, _is_openai(state_dict, path), device, dtype)
    if any(".layer1." in k or "attnpool" in k for k in state_dict):
        raise G4SegError(f"{path.name} is a ResNet CLIP; G4Seg needs a ViT image encoder (ViT-B/16, ViT-L/14, ...)")
    raise G4SegError(f"{path.name} is not a CLIP image encoder G4Seg recognises (expected vision_model.* "
                     "transformers keys or visual.* open_clip keys)")


def _clip_vision_named(name: str, path: Path, device, dtype):
    import open_clip

    from .clip_features import DenseCLIPFeatures

    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(name.lower()[:5])][:8]
        raise G4SegError(f"{name!r} is not an open_clip model name; e.g. {close or ['ViT-B-16', 'ViT-L-14']}")
    state_dict = load_state_dict_file(path) if path.is_file() else None
    if state_dict is None:
        raise G4SegError(f"{path} is not a weights file")
    quick = name.endswith("quickgelu") or _is_openai(state_dict, path)
    try:
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    except Exception as exc:
        raise G4SegError(f"open_clip could not build {name!r}: {exc}") from exc
    visual = _strip_to(state_dict, "conv1.weight", ("positional_embedding",)) or {}
    if hasattr(model.visual, "proj") and model.visual.proj is None:
        visual.pop("proj", None)
    _assign_weights(model.visual, visual, f"{name} image encoder", path.name, assign=False)
    return DenseCLIPFeatures.from_open_clip(model.visual, name=f"{name} ({path.name})").to(device, dtype)
