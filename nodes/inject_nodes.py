"""G4SegInjectAttention and G4SegOneStepDenoise (paper steps 4-5)."""

from __future__ import annotations

from typing import List, Tuple

import torch

from g4seg_core.config import EMI_MODES, EMI_SCHEDULES, G4SegConfig, fill_prompt
from g4seg_core.errors import G4SegError
from g4seg_core.injection import InjectionSettings

from . import attention_patch
from .common import CATEGORY, class_name_or_error, mask_batch

_D = G4SegConfig()


def class_token_positions(clip, prompt: str, class_name: str, occurrences: int = 1) -> Tuple[dict, List[int]]:
    """Tokenize with the CLIP object's own tokenizer(s); positions of the class name's tokens
    (every one of the template's `occurrences` '{}')."""
    tokens = clip.tokenize(prompt)
    label_tokens = clip.tokenize(class_name)
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


def build_settings(masks: torch.Tensor, positions, emi_mode, cross_weight, self_weight, area_scale, schedule):
    if emi_mode not in EMI_MODES:
        raise G4SegError(f"emi_mode {emi_mode!r}: choose one of {EMI_MODES}")
    if schedule not in EMI_SCHEDULES:
        raise G4SegError(f"schedule {schedule!r}: choose one of {EMI_SCHEDULES}")
    return [InjectionSettings(mask=m.detach().float().cpu().clamp(0, 1), token_positions=list(positions),
                              mode=emi_mode, cross_weight=float(cross_weight), self_weight=float(self_weight),
                              area_scale=float(area_scale), schedule=schedule)
            for m in masks]


def encode_prompt(clip, class_name, prompt_template):
    """(prompt, class token positions, CONDITIONING) for the class name in the template."""
    name = class_name_or_error(class_name)
    prompt = fill_prompt(prompt_template, name)
    tokens, positions = class_token_positions(clip, prompt, name, occurrences=prompt_template.count("{}"))
    return prompt, positions, encode_tokens(clip, tokens)


def inject_attention(model, clip, mask, class_name, prompt_template, emi_mode, cross_weight, self_weight,
                     area_scale, schedule, encoded=None):
    """Patched model clone, CONDITIONING and an info line; `encoded` reuses an encode_prompt result."""
    masks = mask_batch(mask)
    attention_patch.model_family(model)  # fail early, before tokenizing
    prompt, positions, conditioning = encoded or encode_prompt(clip, class_name, prompt_template)
    settings = build_settings(masks, positions, emi_mode, cross_weight, self_weight, area_scale, schedule)
    patched, family, blocks = attention_patch.inject(model, settings)
    info = (f"{family}: prompt {prompt!r}, class tokens at {positions}, {blocks} transformer blocks patched "
            f"(attn1+attn2), mode {emi_mode}, cross {cross_weight}, self {self_weight}, schedule {schedule}, "
            f"{masks.shape[0]} mask(s) {masks.shape[2]}x{masks.shape[1]}")
    return patched, conditioning, info


class G4SegInjectAttention:
    DESCRIPTION = ("Explicit Mask Injection (G4Seg Eq. 3-5): a clone of the model whose self- and cross-attention "
                   "favour the mask region for the class tokens, plus the prompt's CONDITIONING. Other packs' "
                   "attention replace patches already on the model are wrapped, not overwritten.")
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL", "CONDITIONING", "STRING")
    RETURN_NAMES = ("model", "positive", "info")
    OUTPUT_TOOLTIPS = ("The model with the mask injected into every UNet attention layer.",
                       "The encoded prompt (template with the class name) to use as positive conditioning.",
                       "What was patched: family, prompt, class token positions.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL UNet model."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder; its tokenizer locates the class-name tokens."}),
            "mask": ("MASK", {"tooltip": "Coarse foreground probability (or binary) mask; one per image or one for the batch. Resized to every block's token grid (area average, >= 0.5)."}),
            "class_name": ("STRING", {"default": "cat", "tooltip": "The object's class name, inserted into the prompt template; must tokenize inside the prompt."}),
            "prompt_template": ("STRING", {"default": _D.prompt_template, "tooltip": "Prompt with '{}' where the class name goes (paper: 'a photo of a {}')."}),
            "emi_mode": (list(EMI_MODES), {"default": _D.emi_mode, "tooltip": "densediffusion: DenseDiffusion's value-range-aware modulation (the paper follows it); additive: Eq. 5 bias; off: no injection (plain prompt)."}),
            "cross_weight": ("FLOAT", {"default": _D.cross_weight, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": "Cross-attention strength. additive: the weight a of Eq. 5, on the QK^T scale (before 1/sqrt(d)); densediffusion: DenseDiffusion's w (default 1.0)."}),
            "self_weight": ("FLOAT", {"default": _D.self_weight, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": "Self-attention strength, same scale as cross_weight (DenseDiffusion default 0.3)."}),
            "area_scale": ("FLOAT", {"default": _D.area_scale, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "densediffusion only: s in (1 - s*area), weakening the push for large masks."}),
            "schedule": (list(EMI_SCHEDULES), {"default": _D.emi_schedule, "tooltip": "constant: same strength at every step; t5: DenseDiffusion's (t/1000)^5 factor from the model's own sigma->timestep map (almost off at t=400)."}),
        }}

    def apply(self, model, clip, mask, class_name, prompt_template, emi_mode, cross_weight, self_weight,
              area_scale, schedule):
        return inject_attention(model, clip, mask, class_name, prompt_template, emi_mode, cross_weight,
                                self_weight, area_scale, schedule)


# --------------------------------------------------------------------------- one-step denoise

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


def one_step_denoise(model, positive, latent, timestep, seed, negative=None, cfg=1.0):
    import comfy.sample
    import comfy.samplers

    if not 1 <= int(timestep) <= 999:
        raise G4SegError(f"timestep={timestep}: use 1..999 (paper default 400)")
    attention_patch.model_family(model)
    sampling = model.get_model_object("model_sampling")
    sigma = sigma_for_timestep(sampling, int(timestep))
    samples = latent["samples"]
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(samples, int(seed), latent.get("batch_index"))
    if negative is None:
        negative = zero_conditioning(positive)
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float32)
    sampler = comfy.samplers.sampler_object("euler")
    x0 = comfy.sample.sample_custom(model, noise, float(cfg), sampler, sigmas, positive, negative, samples,
                                    noise_mask=latent.get("noise_mask"), disable_pbar=True, seed=int(seed))
    out = latent.copy()
    out["samples"] = x0
    out.pop("noise_mask", None)
    return out, sigma


class G4SegOneStepDenoise:
    DESCRIPTION = ("Noise the latent to timestep t with the model's own schedule (z_t = x0 + sigma_t * eps) and "
                   "predict x0 in one model call (one Euler step to sigma 0 via sample_custom, so ControlNet and "
                   "hooks keep working). Works for eps, v and LCM models.")
    CATEGORY = CATEGORY
    FUNCTION = "denoise"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("x0",)
    OUTPUT_TOOLTIPS = ("The one-step x0 prediction; decode it with VAEDecode.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "Usually the output of G4Seg Inject Attention (or a ControlNet-conditioned model)."}),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning (from G4Seg Inject Attention or CLIPTextEncode)."}),
            "latent": ("LATENT", {"tooltip": "VAE-encoded original image (x0)."}),
            "timestep": ("INT", {"default": _D.timestep, "min": 1, "max": 999, "tooltip": "DDPM timestep t to noise to (paper: 400; Fig. 4 sweeps 100-700). Converted to sigma with the model's own schedule."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True, "tooltip": "Seed of the noise eps."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "Optional negative conditioning (only used when cfg != 1)."}),
            "cfg": ("FLOAT", {"default": _D.cfg_scale, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free guidance scale. 1.0 (default) = one conditional pass, as in the paper."}),
        }}

    def denoise(self, model, positive, latent, timestep, seed, negative=None, cfg=1.0):
        out, _ = one_step_denoise(model, positive, latent, timestep, seed, negative=negative, cfg=cfg)
        return (out,)
