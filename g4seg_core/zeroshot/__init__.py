"""Words -> coarse mask: training-free open-vocabulary segmentation on a plain CLIP (NACLIP recipe).

    from g4seg_core.zeroshot import load_segmenter
    seg = load_segmenter(clip="clip_vision_h.safetensors", text="v2-1_512-ema-pruned.safetensors")
    result = seg.segment(image, "cat, sofa|couch, person")   # result.probs [K, H, W], result.labels

Modules: `vocabulary` (templates, background words, class lists), `neighbourhood` (NACLIP's last
block), `text` (text towers, template averaging, loading), `segment` (windows, probabilities,
label map). Quality with ViT-H/14 is unpublished (see docs/TEXT_TO_MASK.md).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .neighbourhood import LastBlock, neighbourhood_attention, neighbourhood_bias, neighbourhood_features
from .config import SEGMENTER_KNOBS, ZeroShotConfig
from .segment import MAX_WINDOWS, MAX_WORK_PIXELS, ZeroShotResult, ZeroShotSegmenter, plan, sliding_windows
from .text import QueryEmbeddings, check_widths, class_embedding, load_text_tower
from .vocabulary import IMAGENET_TEMPLATES, STUFF_WORDS, ClassList, parse_classes


def load_segmenter(clip, text, config: Optional[ZeroShotConfig] = None, device: Union[str, torch.device] = "cpu",
                   dtype: torch.dtype = torch.float32) -> ZeroShotSegmenter:
    """A ZeroShotSegmenter from a CLIP image-encoder file/spec and a text-tower file/spec (local files only).

    Args:
        clip: what `clip_loading.load_clip_vision` takes (models/clip_vision file, open_clip weights,
            'ViT-B-16:/path/weights.bin').
        text: what `text.load_text_tower` takes (SD2.x/SDXL single-file checkpoint, open_clip CLIP file,
            SDXL diffusers folder); may be the same file as `clip` for a full open_clip CLIP.
    """
    config = config or ZeroShotConfig()
    tower = load_text_tower(text, device=device, dtype=dtype)
    return ZeroShotSegmenter(load_matching_features(clip, tower, config.sigma, device, dtype), tower, config)


def load_matching_features(clip, tower, sigma: float, device="cpu", dtype: torch.dtype = torch.float32):
    """NACLIP features of the CLIP image encoder `clip`, checked to embed into the text tower's space."""
    from ..loading.clip_loading import load_clip_vision

    features = neighbourhood_features(load_clip_vision(clip, device=device, dtype=dtype), sigma)
    vision_width = _output_width(features.module)
    if vision_width is not None:
        check_widths(tower.width, vision_width, f"text encoder {tower.name}", f"CLIP vision model {features.name}")
    return features


def _output_width(module) -> Optional[int]:
    proj = getattr(module, "proj", None)  # open_clip
    if proj is not None:
        return int(proj.shape[1])
    projection = getattr(module, "visual_projection", None)  # transformers
    if projection is not None:
        return int(projection.weight.shape[0])
    return None


__all__ = ["ClassList", "IMAGENET_TEMPLATES", "LastBlock", "MAX_WINDOWS", "MAX_WORK_PIXELS", "QueryEmbeddings", "SEGMENTER_KNOBS", "STUFF_WORDS",
           "ZeroShotConfig", "ZeroShotResult", "ZeroShotSegmenter", "check_widths",
           "class_embedding", "load_matching_features", "load_segmenter", "load_text_tower",
           "neighbourhood_attention", "neighbourhood_bias", "neighbourhood_features",
           "parse_classes", "plan", "sliding_windows"]
