"""G4SegDenseCRF: a fully connected CRF on a probability MASK (the paper's G4Seg + DenseCRF)."""

from __future__ import annotations

import numpy as np
import torch

from g4seg_core.config import G4SegConfig
from g4seg_core.evaluation.densecrf import dense_crf
from g4seg_core.method.masks import validate_probability

from .common import (CATEGORY, Progress, check_interrupt, check_same_size, image_batch, knob_inputs, mask_batch,
                     pair_batches, pick, stack_masks)
from .preview import with_preview

_D = G4SegConfig()


def crf_refine_batch(image, mask, iterations: int = 10, gaussian_sxy: float = 3.0, gaussian_compat: float = 3.0,
                     bilateral_sxy: float = 80.0, bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0,
                     confidence: float = 1.0, threshold: float = _D.threshold):
    """IMAGE [B, H, W, C] + MASK -> (refined probability [B, H, W], binary [B, H, W])."""
    images, masks = image_batch(image), mask_batch(mask)
    n = pair_batches(images, masks)
    check_same_size(tuple(masks.shape[1:]), tuple(images.shape[1:3]),
                    resize_hint="the CRF works at the image's resolution: resize the mask to the image first")
    # Only the foreground probability is read: a 2-label CRF with background = 1 - p.
    progress, probs = Progress(n), []
    for i in range(n):
        check_interrupt()
        img, prob = pick(images, i), pick(masks, i)
        rgb = np.clip(np.rint(img.cpu().numpy() * 255.0), 0, 255).astype(np.uint8)
        refined = dense_crf(rgb, validate_probability(prob, name="mask"), iterations=int(iterations),
                            gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                            bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                            bilateral_compat=bilateral_compat,
                            confidence=float(confidence))  # 1.0: the mask as is
        probs.append(torch.from_numpy(refined))
        progress.update(1)
    prob_out = stack_masks(probs)
    return prob_out, (prob_out >= float(threshold)).float()


class G4SegDenseCRF:
    DESCRIPTION = ("Refine a probability mask with a fully connected CRF (Kraehenbuehl & Koltun) that snaps it to "
                   "the image's colour edges. After Refine Mask / Mix Foreground it gives the paper's best "
                   "combination, G4Seg + DenseCRF. Needs the optional package pydensecrf2 "
                   "(pip install pydensecrf2).")
    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("probability", "binary_mask", "overlay")
    OUTPUT_TOOLTIPS = ("CRF foreground marginals in [0, 1].", "Marginals >= threshold.",
                       "Input mask (red) | CRF result (green) on the image; also shown in the node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image the mask belongs to (same size as the mask); its colours drive the bilateral kernel."}),
            "mask": ("MASK", {"tooltip": "Foreground probability (e.g. Refine Mask's probability output). Binary masks work too; lower confidence then."}),
            "iterations": ("INT", {"default": 10, "min": 1, "max": 100, "tooltip": "Mean-field iterations."}),
            "gaussian_sxy": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 100.0, "step": 0.1, "tooltip": "Smoothness kernel: spatial standard deviation in pixels."}),
            "gaussian_compat": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Smoothness kernel weight (0 turns it off)."}),
            "bilateral_sxy": ("FLOAT", {"default": 80.0, "min": 1.0, "max": 500.0, "step": 1.0, "tooltip": "Appearance kernel: spatial standard deviation in pixels."}),
            "bilateral_srgb": ("FLOAT", {"default": 13.0, "min": 1.0, "max": 255.0, "step": 0.5, "tooltip": "Appearance kernel: colour standard deviation (0-255 RGB)."}),
            "bilateral_compat": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Appearance kernel weight (0 turns it off)."}),
            "confidence": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Trust in the mask: the unary uses c*p + (1-c)/2. 1.0 uses it as is; about 0.8 keeps hard 0/1 masks from pinning every pixel."}),
            **knob_inputs("threshold"),
        }}

    def refine(self, image, mask, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
               bilateral_compat, confidence, threshold):
        outputs = crf_refine_batch(image, mask, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy,
                                   bilateral_srgb, bilateral_compat, confidence, threshold)
        return with_preview(outputs, image, mask, outputs[0], threshold, refined_title="DenseCRF")
