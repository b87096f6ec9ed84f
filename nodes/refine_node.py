"""G4SegRefine: the whole method in one node (inject -> encode -> one step -> decode -> match -> mix)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import numpy as np
import torch

from g4seg_core import masks as core_masks
from g4seg_core.softening import prepare_coarse
from g4seg_core.config import DIRECTIONS, EMI_MODES, EMI_SCHEDULES, SOFTEN_MODES, G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.mixing import update_from_features

from . import attention_patch
from .common import (CATEGORY, Progress, check_aspect, check_interrupt, class_name_or_error, image_batch,
                     intermediate_device, mask_batch, pair_batches, pick, resize_map)
from .correspondence_nodes import comfy_clip_vision_features, features_for
from .inject_nodes import encode_prompt, inject_attention, one_step_denoise

_D = G4SegConfig()
log = logging.getLogger("g4seg")


@contextmanager
def _stage(timings: dict, name: str):
    """Wall time of one stage (GPU work finished first, so the time is the stage's own)."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def working_size(size: int, hw) -> tuple:
    """size 0 keeps the image size (rounded down to a multiple of 8); else size x size (paper: 512x512)."""
    if size == 0:
        h, w = (int(hw[0]) // 8) * 8, (int(hw[1]) // 8) * 8
        if h < 64 or w < 64:
            raise G4SegError(f"image {hw[1]}x{hw[0]} is too small: use at least 64x64 or set size")
        return h, w
    if size % 64 or not 64 <= size <= 2048:
        raise G4SegError(f"size={size}: use 0 (keep) or a multiple of 64 in 64..2048 (512 SD1/2, 768 SD2-v, 1024 SDXL)")
    return size, size


@torch.no_grad()  # ComfyUI runs nodes under inference_mode; direct callers should not build autograd graphs
def refine(model, clip, vae, clip_vision, image, mask, class_name, timestep, seed, emi_mode, cross_weight,
           self_weight, beta, band_low, band_high, iterations, threshold, size, soften, soften_width,
           prompt_template=_D.prompt_template, area_scale=_D.area_scale, schedule=_D.emi_schedule,
           grid=_D.correspondence_grid, direction=_D.direction, cfg=1.0, negative=None, extractor=None,
           stage_timings=None):
    """The node's work; `stage_timings`, a list, receives one {stage: seconds} dict per image."""
    class_name = class_name_or_error(class_name)
    if soften not in SOFTEN_MODES:
        raise G4SegError(f"soften {soften!r}: choose one of {SOFTEN_MODES}")
    if direction not in DIRECTIONS:
        raise G4SegError(f"direction {direction!r}: choose one of {DIRECTIONS}")
    if not 0.0 <= band_low <= band_high <= 1.0:
        raise G4SegError(f"band [{band_low}, {band_high}]: use 0 <= low <= high <= 1 (paper: 0.2, 0.6)")
    attention_patch.model_family(model)
    images = image_batch(image)
    masks = mask_batch(mask)
    batch = pair_batches(images, masks)
    img_hw = tuple(images.shape[1:3])
    mask_hw = tuple(masks.shape[1:3])
    check_aspect(mask_hw, img_hw, what="mask vs image")
    work_hw = working_size(int(size), img_hw)
    if extractor is None:
        extractor = comfy_clip_vision_features(clip_vision)

    encode_start = time.perf_counter()
    encoded = encode_prompt(clip, class_name, prompt_template)  # once for the whole batch
    encode_s = time.perf_counter() - encode_start
    bar = Progress(batch)
    refined_all, generated_all = [], []
    image_side = None  # (working image, latent, CLIP features): once when one image serves every mask
    for i in range(batch):
        check_interrupt()
        img = pick(images, i)
        # Same preparation as the core pipeline: validate, soften a binary mask at the mask's own
        # resolution (width in working-size pixels), inject a working-size copy, mix at mask size.
        soft_np, _ = prepare_coarse(pick(masks, i).cpu().numpy(), max(work_hw), soften,
                                               float(soften_width))
        soft = torch.from_numpy(np.ascontiguousarray(soft_np, dtype=np.float32))
        work_prob = torch.from_numpy(np.ascontiguousarray(
            core_masks.resize_probability(soft_np, work_hw, mode="bilinear"), dtype=np.float32))
        timings = {"encode_prompt": encode_s} if i == 0 else {}
        if image_side is None or images.shape[0] > 1:
            work_img = resize_map(img.permute(2, 0, 1), work_hw).permute(1, 2, 0).clamp(0, 1)[None]
            with _stage(timings, "vae_encode"):
                samples = vae.encode(work_img[:, :, :, :3])
            with _stage(timings, "clip_original"):
                of = features_for(extractor, work_img[0].cpu(), work_hw)
            image_side = (samples, of)
        samples, of = image_side
        with _stage(timings, "inject"):
            patched, positive, _ = inject_attention(model, clip, work_prob, class_name, prompt_template, emi_mode,
                                                    cross_weight, self_weight, area_scale, schedule, encoded=encoded)
        latent = {"samples": samples}
        with _stage(timings, "unet"):
            x0, _ = one_step_denoise(patched, positive, latent, int(timestep), int(seed) + i, negative=negative,
                                     cfg=cfg)
        with _stage(timings, "vae_decode"):
            generated = vae.decode(x0["samples"]).float()
            if generated.dim() == 5:  # some VAEs return [B, T, H, W, C]
                generated = generated.reshape(-1, *generated.shape[-3:])
            gen = generated[0].cpu().clamp(0, 1)
            if tuple(gen.shape[:2]) != work_hw:
                gen = resize_map(gen.permute(2, 0, 1), work_hw).permute(1, 2, 0)
        with _stage(timings, "clip_generated"):
            gf = features_for(extractor, gen, work_hw)
        with _stage(timings, "correspondence_and_mixing"):
            out = update_from_features(soft, of, gf, beta=float(beta), band=(float(band_low), float(band_high)),
                                       iterations=int(iterations), direction=direction, grid=int(grid))
        log.info("G4SegRefine image %d/%d: %s", i + 1, batch,
                 ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        if stage_timings is not None:
            stage_timings.append(timings)
        refined_all.append(torch.as_tensor(out).float())  # already at the mask's size
        generated_all.append(gen)
        bar.update(1)

    refined = torch.stack(refined_all).to(intermediate_device())
    generated = torch.stack(generated_all).to(intermediate_device())
    return refined, (refined >= float(threshold)).float(), generated


class G4SegRefine:
    DESCRIPTION = ("G4Seg in one node: soften the coarse mask, inject it into the UNet's attention, noise the image "
                   "to timestep t and predict it back in one step, match original and generated images with dense "
                   "CLIP features, and mix the mask along the matches (uncertain pixels only).")
    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("refined", "binary", "generated")
    OUTPUT_TOOLTIPS = ("Refined probability map at the input mask's size.", "refined >= threshold.",
                       "The one-step generated image at the working size.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.x, SD2.x or SDXL UNet (LCM/Turbo variants included)."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT image encoder for the dense correspondence (CLIPVisionLoader)."}),
            "image": ("IMAGE", {"tooltip": "Image(s) to segment."}),
            "mask": ("MASK", {"tooltip": "Coarse mask(s): one per image or one for all; same aspect ratio as the image (any resolution; the output has the mask's size)."}),
            "class_name": ("STRING", {"default": "cat", "tooltip": "The object's class name (goes into the prompt template)."}),
            "timestep": ("INT", {"default": _D.timestep, "min": 1, "max": 999, "tooltip": "Noise level t (paper: 400)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True, "tooltip": "Noise seed (image i of a batch uses seed + i)."}),
            "emi_mode": (list(EMI_MODES), {"default": _D.emi_mode, "tooltip": "Mask injection: densediffusion (default), additive (Eq. 5) or off."}),
            "cross_weight": ("FLOAT", {"default": _D.cross_weight, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": "Cross-attention strength (additive: a of Eq. 5, before 1/sqrt(d); densediffusion: w)."}),
            "self_weight": ("FLOAT", {"default": _D.self_weight, "min": 0.0, "max": 20.0, "step": 0.05, "tooltip": "Self-attention strength (same scale as cross_weight)."}),
            "beta": ("FLOAT", {"default": _D.beta, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Weight of the original probability in the mix (0.8 open-vocabulary, 0.9 weakly supervised)."}),
            "band_low": ("FLOAT", {"default": _D.band[0], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Only pixels with band_low <= S <= band_high are updated."}),
            "band_high": ("FLOAT", {"default": _D.band[1], "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Upper end of the update band."}),
            "iterations": ("INT", {"default": _D.iterations, "min": 1, "max": 20, "tooltip": "Mixing iterations."}),
            "threshold": ("FLOAT", {"default": _D.threshold, "min": 0.01, "max": 0.99, "step": 0.01, "tooltip": "Threshold for the binary output."}),
            "size": ("INT", {"default": _D.size, "min": 0, "max": 2048, "step": 64, "tooltip": "Working size: size x size (paper: 512; SD2-768-v: 768; SDXL: 1024); 0 keeps the image size (rounded down to /8)."}),
            "soften": (list(SOFTEN_MODES), {"default": _D.soften, "tooltip": "How a binary mask becomes a probability map (at the working size); soft masks are unchanged."}),
            "soften_width": ("FLOAT", {"default": _D.soften_width, "min": 0.5, "max": 256.0, "step": 0.5, "tooltip": "Softening width in working-size pixels."}),
        }, "optional": {
            "prompt_template": ("STRING", {"default": _D.prompt_template, "tooltip": "Prompt with '{}' for the class name."}),
            "area_scale": ("FLOAT", {"default": _D.area_scale, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip": "densediffusion: s in (1 - s*area)."}),
            "schedule": (list(EMI_SCHEDULES), {"default": _D.emi_schedule, "tooltip": "constant or DenseDiffusion's (t/1000)^5."}),
            "grid": ("INT", {"default": _D.correspondence_grid, "min": 0, "max": 128, "step": 8, "tooltip": "Correspondence grid (0 = CLIP patch grid, max 128)."}),
            "direction": (list(DIRECTIONS), {"default": _D.direction, "tooltip": "Correspondence direction (see G4Seg CLIP Correspondence)."}),
        }}

    def refine(self, model, clip, vae, clip_vision, image, mask, class_name, timestep, seed, emi_mode, cross_weight,
               self_weight, beta, band_low, band_high, iterations, threshold, size, soften, soften_width,
               prompt_template=_D.prompt_template, area_scale=_D.area_scale, schedule=_D.emi_schedule,
               grid=_D.correspondence_grid, direction=_D.direction):
        return refine(model, clip, vae, clip_vision, image, mask, class_name, timestep, seed, emi_mode, cross_weight,
                      self_weight, beta, band_low, band_high, iterations, threshold, size, soften, soften_width,
                      prompt_template=prompt_template, area_scale=area_scale, schedule=schedule, grid=grid,
                      direction=direction)
