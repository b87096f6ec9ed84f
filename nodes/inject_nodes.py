"""G4SegInjectAttention and G4SegOneStepDenoise (paper steps 4-5)."""

from __future__ import annotations

import torch

from g4seg_core.config import G4SegConfig, fill_prompt
from g4seg_core.method.flow import check_label
from g4seg_core.method.injection import InjectionSettings

from .comfy import attention_patch
from .comfy.backend import class_token_positions, encode_tokens, sample_one_step
from .common import CATEGORY, knob_inputs, mask_batch


def build_settings(masks: torch.Tensor, positions, config: G4SegConfig):
    return [InjectionSettings.from_config(m.detach().float().cpu().clamp(0, 1), positions, config) for m in masks]


def encode_prompt(clip, class_name, prompt_template):
    """(prompt, class token positions, CONDITIONING) for the class name in the template."""
    name = check_label(class_name)
    prompt = fill_prompt(prompt_template, name)
    tokens, positions = class_token_positions(clip, prompt, name, occurrences=prompt_template.count("{}"))
    return prompt, positions, encode_tokens(clip, tokens)


def inject_attention(model, clip, mask, class_name, config: G4SegConfig):
    """Patched model clone, CONDITIONING and an info line."""
    masks = mask_batch(mask)
    attention_patch.model_family(model)  # fail early, before tokenizing
    prompt, positions, conditioning = encode_prompt(clip, class_name, config.prompt_template)
    patched, family, blocks = attention_patch.inject(model, build_settings(masks, positions, config))
    info = (f"{family}: prompt {prompt!r}, class tokens at {positions}, {blocks} transformer blocks patched "
            f"(attn1+attn2), mode {config.emi_mode}, cross {config.cross_weight}, self {config.self_weight}, "
            f"schedule {config.emi_schedule}, {masks.shape[0]} mask(s) {masks.shape[2]}x{masks.shape[1]}")
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
            **knob_inputs("prompt_template", "emi_mode", "cross_weight", "self_weight", "area_scale", "schedule"),
        }}

    def apply(self, model, clip, mask, class_name, **knobs):
        return inject_attention(model, clip, mask, class_name, G4SegConfig.from_widgets(knobs))


# --------------------------------------------------------------------------- one-step denoise


def one_step_denoise(model, positive, latent, timestep, seed, negative=None, cfg=1.0):
    """The node's work: ComfyUI's batch noise of `seed` (as KSampler), one step to x0."""
    import comfy.sample

    config = G4SegConfig.from_widgets({"timestep": timestep, "seed": seed, "cfg": cfg})
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, config.seed, latent.get("batch_index"))
    x0 = sample_one_step(model, positive, negative, samples, noise, config.timestep, config.cfg_scale, config.seed,
                         noise_mask=latent.get("noise_mask"))
    out = latent.copy()
    out["samples"] = x0
    out.pop("noise_mask", None)
    return (out,)


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
            **knob_inputs("timestep", "seed"),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "Optional negative conditioning (only used when cfg != 1)."}),
            **knob_inputs("cfg"),
        }}

    def denoise(self, model, positive, latent, timestep, seed, negative=None, cfg=1.0):
        return one_step_denoise(model, positive, latent, timestep, seed, negative=negative, cfg=cfg)
