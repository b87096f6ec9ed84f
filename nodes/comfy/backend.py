"""Everything ComfyUI-specific in one place: flow.Backend on ComfyUI's MODEL, CLIP, VAE and CLIP_VISION.

ComfyBackend runs the method's stages with ComfyUI's own objects so that G4SegRefine is
g4seg_core.method.flow.refine_batch, the orchestration `g4seg refine` runs on diffusers models:
  encode / decode: the VAE object ([B, H, W, C] pixels, ComfyUI's latent space);
  prompt: CLIP.tokenize / encode_from_tokens, class-token positions from the tokenizers' ids;
  denoise: the attention patch (attention_patch.py) and one Euler step from sigma(t) to 0 through
    comfy.sample.sample_custom, so ControlNet, hooks, CFG and v-prediction work as ComfyUI does;
  features: ComfyUI's CLIP vision transformer on the full image (clip_vision.py).
Every `comfy` import is inside a function: the module (and tests with stand-in objects) runs
without ComfyUI.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method.injection import InjectionBatch

from . import attention_patch
from .clip_vision import comfy_clip_vision_features
from ..common import escape_prompt


def class_token_positions(clip, prompt: str, class_name: str, occurrences: int = 1) -> Tuple[dict, List[int]]:
    """Tokenize with the CLIP object's own tokenizer(s); positions of the class name's tokens
    (all of them when the template has `occurrences` > 1 '{}')."""
    tokens = clip.tokenize(escape_prompt(prompt))
    label_tokens = clip.tokenize(escape_prompt(class_name))
    empty_tokens = clip.tokenize("")
    positions = attention_patch.label_positions_from_tokens(tokens, label_tokens, empty_tokens, class_name, prompt,
                                                            occurrences=occurrences)
    return tokens, positions


def encode_tokens(clip, tokens) -> list:
    """CONDITIONING from tokens (as CLIPTextEncode does)."""
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sigma_for_timestep(model_sampling, timestep: int) -> float:
    """The model's own k-diffusion sigma of DDPM step t (e.g. 1.1644 at t=400 for SD)."""
    if not hasattr(model_sampling, "sigma"):
        raise G4SegError("this model has no discrete noise schedule (model_sampling.sigma): "
                         f"{attention_patch.SUPPORTED_FAMILIES} are supported")
    return float(model_sampling.sigma(torch.tensor(float(timestep))).flatten()[0])


def zero_conditioning(positive):
    """A zeroed copy of the positive conditioning (used when no negative is connected)."""
    out = []
    for cond, extra in positive:
        extra = dict(extra)
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(cond), extra])
    return out


def sample_one_step(model, positive, negative, samples: torch.Tensor, noise: torch.Tensor, timestep: int,
                    cfg: float, seed: int, noise_mask=None) -> torch.Tensor:
    """x0 in one model call: noise to sigma(t) (the model's own schedule), one Euler step to sigma 0."""
    import comfy.sample
    import comfy.samplers

    attention_patch.model_family(model)
    sigma = sigma_for_timestep(model.get_model_object("model_sampling"), int(timestep))
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    if negative is None:
        negative = zero_conditioning(positive)
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float32)
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, float(cfg), sampler, sigmas, positive, negative, samples,
                                      noise_mask=noise_mask, disable_pbar=True, seed=int(seed))


class ComfyBackend:
    """g4seg_core.method.flow.Backend on ComfyUI's MODEL, CLIP, VAE and CLIP_VISION (see the module docstring)."""

    # The flow's pixels and masks stay on the host: ComfyUI's VAE takes host pixels and moves them to the device
    # it manages, its latents come back on the host, and its model patches place what they use.
    device = torch.device("cpu")

    def __init__(self, model, clip, vae, clip_vision=None, extractor=None):
        attention_patch.model_family(model)  # fail early on unsupported models
        self.model, self.clip, self.vae, self.clip_vision = model, clip, vae, clip_vision
        self.extractor = extractor if extractor is not None else comfy_clip_vision_features(clip_vision)

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.permute(0, 2, 3, 1).cpu())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents).float()
        if images.dim() == 5:  # some VAEs return [B, T, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        return images.permute(0, 3, 1, 2).cpu().clamp(0, 1)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, kind: str = "last_layer") -> torch.Tensor:
        extractor = self.extractor
        if kind == "naclip":  # NACLIP's last block on the same CLIP_VISION, built once
            if getattr(self, "_naclip", None) is None:
                if self.clip_vision is None:
                    raise G4SegError("clip_features 'naclip' needs a CLIP_VISION model")
                self._naclip = comfy_clip_vision_features(self.clip_vision, "naclip")
            extractor = self._naclip
        return extractor(pixels.clamp(0, 1)).float().cpu()

    def prompt(self, prompt: str, label: Optional[str], occurrences: int = 1) -> Tuple[list, List[int]]:
        if label is None:
            return encode_tokens(self.clip, self.clip.tokenize(escape_prompt(prompt))), []
        tokens, positions = class_token_positions(self.clip, prompt, label, occurrences=occurrences)
        return encode_tokens(self.clip, tokens), positions

    def denoise(self, latents: torch.Tensor, noise: torch.Tensor, prompts: Sequence,
                injection: Optional[InjectionBatch], config: G4SegConfig, negative=None) -> torch.Tensor:
        """One sampling call for the whole batch: rows with different prompts (class names) go in as the rows
        of one batched CONDITIONING (batched_conditioning); only prompts that cannot be stacked are sampled
        apart."""
        out = torch.empty_like(latents)
        for rows, positive in batched_conditioning(prompts):
            model = self.model
            if injection is not None and injection.active:
                part = injection if len(rows) == len(prompts) else injection.select(rows)
                model, _, _ = attention_patch.inject(self.model, part)
            index = torch.tensor(rows)
            x0 = sample_one_step(model, positive, negative, latents[index], noise[index], config.timestep,
                                 config.cfg_scale, config.seed)
            out[index] = x0.to(out.dtype)
        return out


def batched_conditioning(prompts: Sequence) -> List[Tuple[List[int], list]]:
    """[(rows, CONDITIONING)] covering every row of a batch, as few groups as possible.

    ComfyUI uses a conditioning tensor of batch n as the per-row conditioning of n latents (one row
    each), so rows with different prompts share one sampling call: their one-entry CONDITIONINGs are
    stacked along the batch (the cond tensor and every per-prompt tensor such as SDXL's pooled output).
    Rows whose prompts differ in token length or carry other settings are grouped apart.
    """
    if all(p is prompts[0] for p in prompts):
        return [(list(range(len(prompts))), prompts[0])]
    groups: dict = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(_stack_key(prompt, row), []).append(row)
    out = []
    for rows in groups.values():
        first = prompts[rows[0]]
        if len(rows) == 1 or all(prompts[r] is first for r in rows):
            out.append((rows, first))
            continue
        cond = torch.cat([prompts[r][0][0] for r in rows])
        extra = {}
        for key, value in first[0][1].items():
            values = [prompts[r][0][1][key] for r in rows]
            extra[key] = torch.cat(values) if torch.is_tensor(value) else value
        out.append((rows, [[cond, extra]]))
    return out


def _stack_key(prompt, row: int):
    """Rows with equal keys stack into one CONDITIONING: one entry, cond [1, T, C] of one shape, per-prompt
    tensors of batch 1, the same other settings. Anything else gets its own group (the row number)."""
    if not (isinstance(prompt, list) and len(prompt) == 1 and torch.is_tensor(prompt[0][0])
            and prompt[0][0].shape[0] == 1 and isinstance(prompt[0][1], dict)):
        return ("alone", row)
    cond, extra = prompt[0]
    key = [tuple(cond.shape), cond.dtype, str(cond.device)]
    for name in sorted(extra):
        value = extra[name]
        if torch.is_tensor(value):
            if value.dim() == 0 or value.shape[0] != 1:
                return ("alone", row)
            key.append((name, tuple(value.shape), value.dtype, str(value.device)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            key.append((name, value))
        else:
            return ("alone", row)  # hooks, control and the like: not stacked
    return tuple(key)
