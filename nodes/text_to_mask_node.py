"""G4SegTextToMask (words -> coarse masks) and G4SegRefineClasses (those masks -> a refined label map).

Together: image + class list -> refined label map in one graph, with the CLIP and CLIP_VISION a
G4Seg workflow already loads (an SD2.x checkpoint's CLIP + clip_vision_h; SDXL's + clip_vision_g).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch

from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method import multiclass
from g4seg_core.files.palettes import voc_palette
from g4seg_core.zeroshot import SEGMENTER_KNOBS, ZeroShotConfig, ZeroShotSegmenter, check_widths, parse_classes, plan

from .common import CATEGORY, Progress, check_interrupt, image_batch, intermediate_device, knob_inputs, mask_batch
from .comfy.backend import ComfyBackend
from .comfy.clip_vision import comfy_clip_vision_features
from .comfy.zeroshot import query_embeddings
from .refine_node import OPTIONAL_KNOBS, REQUIRED_KNOBS, STAGES

# Widget ids in their permanent order (saved workflows store values by position; append only).
TEXT_REQUIRED = ("background", "prob_threshold", "templates")
TEXT_OPTIONAL = ("short_side", "window", "stride", "logit_scale", "sigma", "window_batch")


def zeroshot_inputs(*names: str) -> dict:
    """Widgets of segmenter knobs, from their one declaration (zeroshot.SEGMENTER_KNOBS: default, range, help)."""
    return SEGMENTER_KNOBS.widget_inputs(*names)


def label_map_image(labels: torch.Tensor) -> torch.Tensor:
    """[B, H, W] integer labels -> IMAGE [B, H, W, 3] in the VOC palette colours (0 = black background)."""
    palette = torch.from_numpy(voc_palette().astype(np.float32) / 255.0)
    return palette[labels.long().cpu()].to(intermediate_device())


def class_names_text(names) -> str:
    return ", ".join(names)


@torch.no_grad()
def text_to_mask(clip, clip_vision, image, classes: str, config: ZeroShotConfig, features=None):
    """(masks [B*K, H, W] image-major, labels [B, H, W] uint8, class names) for every image of the batch."""
    class_list = parse_classes(classes, config.background)
    images = image_batch(image)
    windows = plan(config, images.shape[1], images.shape[2])[1]  # limits checked before any model work
    text = query_embeddings(clip)
    if features is None:
        features = comfy_clip_vision_features(clip_vision, "naclip", config.sigma)
    check_widths(text.width, features.width, f"text encoder ({text.name})", "CLIP_VISION model")
    segmenter = ZeroShotSegmenter(features, text, config)
    bar = Progress(images.shape[0] * windows)

    def progress(n: int) -> None:
        check_interrupt()
        bar.update(n)

    probs, labels = [], []
    for b in range(images.shape[0]):
        check_interrupt()
        result = segmenter.segment(images[b].permute(2, 0, 1), class_list, progress=progress)
        probs.append(torch.from_numpy(result.probs))
        labels.append(torch.from_numpy(result.labels))
    return torch.cat(probs).to(intermediate_device()), torch.stack(labels), list(class_list.classes)


class G4SegTextToMask:
    DESCRIPTION = ("Words -> coarse masks, training-free (NACLIP recipe): the CLIP_VISION tower's last block "
                   "attends to neighbouring, similar patches; every class name is averaged over 80 prompt "
                   "templates with the CLIP text encoder; background = stuff words (sky, wall, ...) and pixels "
                   "whose best class probability is below the threshold. Pair the checkpoint's CLIP with the "
                   "matching vision file: SD2.x + clip_vision_h, SDXL + clip_vision_g. Quality with ViT-H/14 is "
                   "unpublished. On a CPU the 80 templates x (classes + 26 background words) text encodings take "
                   "long the first time (cached afterwards); 'single' templates is 80x faster.")
    CATEGORY = CATEGORY
    FUNCTION = "segment"
    RETURN_TYPES = ("MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("masks", "label_map", "classes")
    OUTPUT_TOOLTIPS = (
        "Per-class probability maps at the image size: one per class in the given order (for several images: "
        "image 1's classes, then image 2's, ...). Soft coarse masks, the kind G4Seg refines.",
        "The argmax label map in VOC colours (black = background, then class 1, 2, ... as in the VOC palette).",
        "The class names in order (first synonym of each), for G4SegRefineClasses.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (SD2.x or SDXL; SD1.x has no text projection)."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The matching CLIP vision file: clip_vision_h (SD2.x), "
                                                       "clip_vision_g (SDXL)."}),
            "image": ("IMAGE", {"tooltip": "Image(s) to segment."}),
            "classes": ("STRING", {"default": "cat, sofa, person", "multiline": True,
                                   "tooltip": "Class names separated by commas or new lines; synonyms of one class "
                                              "with '|' (sofa|couch); 'voc' = the 20 PASCAL VOC classes. A class "
                                              "that is also a background word is not used as background."}),
            **zeroshot_inputs(*TEXT_REQUIRED),
        }, "optional": zeroshot_inputs(*TEXT_OPTIONAL)}

    def segment(self, clip, clip_vision, image, classes, **knobs):
        config = ZeroShotConfig.from_widgets(knobs)
        masks, labels, names = text_to_mask(clip, clip_vision, image, classes, config)
        return masks, label_map_image(labels), class_names_text(names)


def _names(classes: str) -> List[str]:
    return list(parse_classes(classes, "none").classes)


@torch.no_grad()
def refine_classes(model, clip, vae, clip_vision, image, masks, classes: str, config: G4SegConfig, extractor=None):
    """(refined masks [B*K, H, W], label maps [B, H, W] uint8): g4seg_core.method.multiclass.refine_classes per
    image (its rule picks the classes to refine; the others pass through unchanged)."""
    names = _names(classes)
    images = image_batch(image)
    masks = mask_batch(masks, "masks")
    k = len(names)
    if masks.shape[0] != images.shape[0] * k:
        raise G4SegError(f"{masks.shape[0]} masks for {images.shape[0]} image(s) and {k} classes ({classes!r}): "
                         "connect G4SegTextToMask's masks and classes outputs (one mask per class per image)")
    backend = ComfyBackend(model, clip, vae, clip_vision, extractor)
    bar = Progress(images.shape[0] * STAGES)

    def progress(stage: str) -> None:
        check_interrupt()
        bar.update(1)

    refined, labels = [], []
    for b in range(images.shape[0]):
        own = {name: masks[b * k + i] for i, name in enumerate(names)}
        result = multiclass.refine_classes(backend, images[b], own, config, progress=progress)
        refined.extend(torch.from_numpy(p) for p in result.probs.values())
        labels.append(torch.from_numpy(result.labels))
    return torch.stack(refined).to(intermediate_device()), torch.stack(labels)


class G4SegRefineClasses:
    DESCRIPTION = ("G4Seg for several classes of one image, the same as `g4seg segment --refine`: each class whose "
                   "coarse mask, cut at the threshold, has both foreground and background is refined with its own "
                   "name in the prompt (the image is encoded once; one UNet call and one decode for all the classes), "
                   "the others pass through; then all classes are fused into "
                   "a label map (background = (1 - max class probability)^bg_power). Connect G4SegTextToMask's "
                   "masks and classes.")
    CATEGORY = CATEGORY
    FUNCTION = "refine"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("refined", "label_map")
    OUTPUT_TOOLTIPS = ("Refined per-class probabilities, in the order of the input masks.",
                       "The fused label map in VOC colours (black = background).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.x, SD2.x or SDXL UNet."}),
            "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder."}),
            "vae": ("VAE", {"tooltip": "The checkpoint's VAE."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT image encoder for the dense correspondence."}),
            "image": ("IMAGE", {"tooltip": "The image(s) the masks belong to."}),
            "masks": ("MASK", {"tooltip": "One coarse mask per class per image (G4SegTextToMask's masks)."}),
            "classes": ("STRING", {"default": "cat, sofa, person",
                                   "tooltip": "The class names in the order of the masks: connect G4SegTextToMask's "
                                              "classes output (or type them, comma-separated)."}),
            **knob_inputs(*REQUIRED_KNOBS),
        }, "optional": knob_inputs(*OPTIONAL_KNOBS)}

    def refine(self, model, clip, vae, clip_vision, image, masks, classes, **knobs):
        refined, labels = refine_classes(model, clip, vae, clip_vision, image, masks, classes,
                                         G4SegConfig.from_widgets(knobs))
        return refined, label_map_image(labels)
