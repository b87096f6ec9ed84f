"""SDComponents: the diffusers models of one SD checkpoint plus what G4Seg needs to drive them."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence

import torch

from ..errors import G4SegError
from .families import FAMILIES, TEXT_LAYER_MODES, family_configs, normalize_family, scheduler_alphas_cumprod
from ..method.schedule import PREDICTION_TYPES
from .text_encoders import PromptEmbedding, config_values, text_core, build_text_encoder
from .tokenizer import G4SegTokenizer


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
                hidden = text_core(encoder).final_layer_norm(out.hidden_states[-2])
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


def build_unet(config: Mapping):
    """UNet2DConditionModel from a config dict (on the meta device inside `with torch.device("meta")`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config_values(config))


def build_vae(config: Mapping):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(config_values(config))


def components_from_configs(configs: Mapping, family: str, prediction_type: Optional[str] = None,
                            empty: bool = False, alphas_cumprod: Optional[torch.Tensor] = None,
                            files: Sequence = ()) -> SDComponents:
    """Build SDComponents from config dicts {"unet", "vae", "text_encoders": [...]}.

    empty=False initialises random weights (tiny models, benchmarks); empty=True leaves the
    weights on the meta device for a checkpoint to be assigned into (see `assign_weights`).
    """
    family = normalize_family(family)
    with torch.device("meta") if empty else contextlib.nullcontext():  # meta: no init cost
        unet = build_unet(configs["unet"])
        vae = build_vae(configs["vae"])
        encoders = [build_text_encoder(c) for c in configs["text_encoders"]]
    return SDComponents(unet=unet, vae=vae, text_encoders=encoders, tokenizer=G4SegTokenizer(FAMILIES[family]["pads"][0]),
                        family=family, prediction_type=prediction_type or FAMILIES[family]["prediction_type"],
                        alphas_cumprod=scheduler_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod,
                        vae_scaling_factor=float(configs["vae"].get("scaling_factor", 0.18215)), files=list(files))


def random_components(family: str = "sd21") -> SDComponents:
    """Full-size architecture of a family with random weights (benchmarks: speed and memory only)."""
    return components_from_configs(family_configs(family), family)
