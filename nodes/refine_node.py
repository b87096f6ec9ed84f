"""G4SegRefine: the whole method in one node, i.e. g4seg_core.method.flow.refine_batch on ComfyUI's models."""

from __future__ import annotations

import logging

import torch

from g4seg_core.method import flow
from g4seg_core.config import G4SegConfig

from .comfy.backend import ComfyBackend
from .common import (CATEGORY, Progress, check_interrupt, image_batch, intermediate_device, knob_inputs, mask_batch,
                     pair_batches, pick)
from .preview import with_preview

log = logging.getLogger("g4seg")

# Widget ids in their permanent order (saved workflows store values by position; append only).
REQUIRED_KNOBS = ("timestep", "seed", "emi_mode", "cross_weight", "self_weight", "beta", "band_low", "band_high",
                  "iterations", "threshold", "size", "soften", "soften_width")
OPTIONAL_KNOBS = ("prompt_template", "area_scale", "schedule", "grid", "direction", "cfg", "negative_prompt")
STAGES = 5  # vae_encode, clip_original, unet, vae_decode, clip_generated


@torch.no_grad()  # ComfyUI runs nodes under inference_mode; direct callers should not build autograd graphs
def refine(model, clip, vae, clip_vision, image, mask, class_name, config: G4SegConfig, extractor=None,
           stage_timings=None):
    """(refined, binary, generated) of every (image, mask) pair; `stage_timings`, a list, gets the stage times."""
    images = image_batch(image)
    masks = mask_batch(mask)
    batch = pair_batches(images, masks)
    # one image for several masks: the same object each time, so the flow encodes it once
    image_list = [images[0]] * batch if images.shape[0] == 1 else [images[i] for i in range(batch)]
    backend = ComfyBackend(model, clip, vae, clip_vision, extractor)
    bar = Progress(STAGES)

    def progress(stage: str) -> None:
        check_interrupt()
        bar.update(1)

    results = flow.refine_batch(backend, image_list, [pick(masks, i) for i in range(batch)], class_name, config,
                                progress=progress)
    timings = results[0].timings
    log.info("G4SegRefine %d image(s): %s", batch, ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    if stage_timings is not None:
        stage_timings.append(timings)
    refined = torch.stack([torch.from_numpy(r.prob) for r in results]).to(intermediate_device())
    generated = torch.stack([torch.from_numpy(r.generated_pixels) for r in results]).to(intermediate_device())
    return refined, (refined >= config.threshold).float(), generated


class G4SegRefine:
    DESCRIPTION = ("G4Seg in one node: soften the coarse mask, inject it into the UNet's attention, noise the image "
                   "to timestep t and predict it back in one step, match original and generated images with dense "
                   "CLIP features, and mix the mask along the matches (uncertain pixels only). The same flow as "
                   "`g4seg refine`: the same weights and seed give the same mask.")
    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE", "IMAGE")
    RETURN_NAMES = ("refined", "binary", "generated", "overlay")
    OUTPUT_TOOLTIPS = ("Refined probability map at the input mask's size.", "refined >= threshold.",
                       "The one-step generated image at the working size.",
                       "Coarse mask (red) | refined mask (green) on the image; also shown in the node.")

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
            **knob_inputs(*REQUIRED_KNOBS),
        }, "optional": knob_inputs(*OPTIONAL_KNOBS)}

    def refine(self, model, clip, vae, clip_vision, image, mask, class_name, **knobs):
        config = G4SegConfig.from_widgets(knobs)
        outputs = refine(model, clip, vae, clip_vision, image, mask, class_name, config)
        return with_preview(outputs, image, mask, outputs[0], config.threshold)
