"""G4SegCLIPCorrespondence and G4SegMixForeground (paper steps 6-9)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method.masks import check_same_framing
from g4seg_core.method.mixing import correspondence_for, update_from_features

from .comfy.clip_vision import comfy_clip_vision_features
from .common import (CATEGORY, Progress, check_interrupt, image_batch, knob_inputs,
                     image_to_chw, intermediate_device, mask_batch, pick, resize_map, stack_masks)
from .preview import with_preview

CORRESPONDENCE_TYPE = "G4SEG_CORRESPONDENCE"


@dataclass
class G4SegCorrespondence:
    """Dense CLIP features of the original and generated images (one entry per image)."""

    orig_feats: torch.Tensor  # [B, C, h, w], L2-normalised
    gen_feats: torch.Tensor   # [B, C, h, w]
    grid: int
    direction: str
    image_size: Tuple[int, int]  # (H, W) of the original image
    originals: Optional[torch.Tensor] = None  # IMAGE [B, H, W, 3], for Mix Foreground's before/after picture

    def __len__(self) -> int:
        return self.orig_feats.shape[0]


# --------------------------------------------------------------------------- ComfyUI CLIP_VISION adapter


def features_for(extractor, image_hwc: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] image resized to size_hw -> [C, h, w] features."""
    x = resize_map(image_to_chw(image_hwc)[0], size_hw)[None]
    with torch.no_grad():
        return extractor(x.clamp(0, 1))[0].float().cpu()


def check_generated_size(orig_hw, gen_hw, max_crop: int = 16) -> None:
    """The generated image is a VAE round trip of the original: equal size, or a few pixels smaller."""
    dh, dw = orig_hw[0] - gen_hw[0], orig_hw[1] - gen_hw[1]
    if tuple(orig_hw) == tuple(gen_hw):
        return
    if 0 <= dh < max_crop and 0 <= dw < max_crop:
        return
    raise G4SegError(f"generated image is {gen_hw[1]}x{gen_hw[0]} but the original is {orig_hw[1]}x{orig_hw[0]} (WxH): "
                     "decode the latent of this very image (VAEEncode -> G4Seg One-Step Denoise -> VAEDecode)")


def match_visualisation(orig_img: torch.Tensor, gen_img: torch.Tensor, corr_orig: torch.Tensor,
                        corr_gen: torch.Tensor, direction: str, grid: int) -> torch.Tensor:
    """[H, W, 3]: the original rebuilt from the generated image through the match (o->g), or the reverse.

    A good correspondence looks like the source image; misplaced regions show as seams.
    """
    source, target = (gen_img, orig_img) if direction == "original_to_generated" else (orig_img, gen_img)
    h, w = target.shape[0], target.shape[1]
    _, delta = correspondence_for(corr_orig, corr_gen, (h, w), direction, grid)  # the mixing's own match
    src = resize_map(source.permute(2, 0, 1), (h, w))  # [3, h, w]
    idx = delta.cpu().flatten()
    return src.reshape(3, -1)[:, idx].reshape(3, h, w).permute(1, 2, 0).clamp(0, 1)


def clip_correspondence(clip_vision, original, generated, grid, direction, extractor=None):
    G4SegConfig.from_widgets({"grid": grid, "direction": direction})  # the knobs' own checks
    orig = image_batch(original, "original image")
    gen = image_batch(generated, "generated image")
    if orig.shape[0] != gen.shape[0] and gen.shape[0] != 1 and orig.shape[0] != 1:
        raise G4SegError(f"original batch ({orig.shape[0]}) and generated batch ({gen.shape[0]}) differ")
    batch = max(orig.shape[0], gen.shape[0])
    orig_hw = tuple(orig.shape[1:3])
    check_generated_size(orig_hw, tuple(gen.shape[1:3]))
    extractor = extractor or comfy_clip_vision_features(clip_vision)
    bar = Progress(batch)
    of, gf, vis = [], [], []
    for i in range(batch):
        check_interrupt()
        o_img, g_img = pick(orig, i), pick(gen, i)
        fo = features_for(extractor, o_img, orig_hw)
        fg = features_for(extractor, g_img, orig_hw)
        of.append(fo)
        gf.append(fg)
        vis.append(match_visualisation(o_img, resize_map(g_img.permute(2, 0, 1), orig_hw).permute(1, 2, 0),
                                       fo, fg, direction, grid))
        bar.update(1)
    corr = G4SegCorrespondence(torch.stack(of), torch.stack(gf), int(grid), direction, orig_hw, originals=orig)
    return corr, torch.stack(vis).to(intermediate_device())


class G4SegCLIPCorrespondence:
    DESCRIPTION = ("Semantic Correspondence Alignment (G4Seg Eq. 8): dense CLIP features of the original and the "
                   "generated image (full image, positional embedding interpolated, no centre crop).")
    CATEGORY = CATEGORY
    FUNCTION = "match"
    RETURN_TYPES = (CORRESPONDENCE_TYPE, "IMAGE")
    RETURN_NAMES = ("correspondence", "match_preview")
    OUTPUT_TOOLTIPS = ("Features of both images, for G4Seg Mix Foreground.",
                       "The source image re-assembled through the matches (should resemble the target image).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "A CLIP ViT image encoder (CLIPVisionLoader), e.g. ViT-L/14 or ViT-H/14."}),
            "original": ("IMAGE", {"tooltip": "The original image."}),
            "generated": ("IMAGE", {"tooltip": "The one-step generated image (VAEDecode of G4Seg One-Step Denoise); same size as the original, or up to 15 px smaller from the VAE's multiple-of-8 crop."}),
            **knob_inputs("grid", "direction"),
        }}

    def match(self, clip_vision, original, generated, grid, direction):
        return clip_correspondence(clip_vision, original, generated, grid, direction)


# --------------------------------------------------------------------------- mixing

def mix_foreground(mask, correspondence, beta, band_low, band_high, iterations, threshold):
    if not isinstance(correspondence, G4SegCorrespondence):
        raise G4SegError("correspondence must come from G4Seg CLIP Correspondence")
    G4SegConfig.from_widgets({"beta": beta, "band_low": band_low, "band_high": band_high,
                              "iterations": iterations, "threshold": threshold})  # the knobs' own checks
    masks = mask_batch(mask)
    n = len(correspondence)
    if masks.shape[0] not in (1, n) and n != 1:
        raise G4SegError(f"mask batch ({masks.shape[0]}) and correspondence batch ({n}) differ")
    batch = max(masks.shape[0], n)
    mh, mw = masks.shape[1:]
    check_same_framing(correspondence.image_size, (mh, mw))
    bar = Progress(batch)
    out = []
    for i in range(batch):
        check_interrupt()
        prob = pick(masks, i).clamp(0, 1)
        j = i if n > 1 else 0
        refined = update_from_features(prob, correspondence.orig_feats[j], correspondence.gen_feats[j],
                                       beta=float(beta), band=(float(band_low), float(band_high)),
                                       iterations=int(iterations), direction=correspondence.direction,
                                       grid=int(correspondence.grid))
        out.append(torch.as_tensor(refined).float().clamp(0, 1))
        bar.update(1)
    refined = stack_masks(out)
    return refined, (refined >= float(threshold)).float()


class G4SegMixForeground:
    DESCRIPTION = ("Mixing with coarse filtering (G4Seg Eq. 9): S* = beta*S + (1-beta)*S[match] on pixels whose "
                   "probability lies in [band_low, band_high], repeated `iterations` times.")
    CATEGORY = CATEGORY
    FUNCTION = "mix"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("refined", "binary", "overlay")
    OUTPUT_TOOLTIPS = ("Refined probability map (same size as the input mask).", "refined >= threshold.",
                       "Coarse mask (red) | refined mask (green) on the original image; also shown in the node.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": ("MASK", {"tooltip": "Coarse probability map (soften binary masks first: G4Seg Load Coarse Mask does). Any resolution with the image's aspect ratio."}),
            "correspondence": (CORRESPONDENCE_TYPE, {"tooltip": "From G4Seg CLIP Correspondence."}),
            **knob_inputs("beta", "band_low", "band_high", "iterations", "threshold"),
        }}

    def mix(self, mask, correspondence, beta, band_low, band_high, iterations, threshold):
        outputs = mix_foreground(mask, correspondence, beta, band_low, band_high, iterations, threshold)
        return with_preview(outputs, correspondence.originals, mask, outputs[0], threshold)
