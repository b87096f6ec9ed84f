"""Pure conversion helpers shared by the node classes (no ComfyUI import at module level).

ComfyUI conventions: IMAGE is float [B, H, W, C] in [0, 1]; MASK is float [B, H, W]
(single masks also arrive as [H, W] or [1, H, W]); LATENT is {"samples": [B, C, h, w], ...}.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from g4seg_core.config import KNOB_SET
from g4seg_core.errors import G4SegError

CATEGORY = "G4Seg"


# --------------------------------------------------------------------------- prompts

def escape_prompt(text: str) -> str:
    """Parentheses as literal text, not ComfyUI prompt weighting ('potted plant (indoor)'): the core's
    tokenizer reads them literally, and the node must condition on the same text."""
    return text.replace("(", "\\(").replace(")", "\\)")


# --------------------------------------------------------------------------- widgets from the knob table

def knob_inputs(*widget_ids: str, defaults: Optional[dict] = None, tooltips: Optional[dict] = None) -> dict:
    """ComfyUI widget declarations of G4Seg knobs (g4seg_core.config.KNOBS), in the order given
    (knobs.KnobSet.widget_inputs: type, default, range, step and tooltip from the knob's one declaration)."""
    return KNOB_SET.widget_inputs(*widget_ids, defaults=defaults, tooltips=tooltips)


# --------------------------------------------------------------------------- comfy access (lazy)

def intermediate_device():
    try:
        import comfy.model_management as mm
        return mm.intermediate_device()
    except Exception:
        return torch.device("cpu")


def check_interrupt() -> None:
    try:
        import comfy.model_management as mm
    except Exception:
        return
    mm.throw_exception_if_processing_interrupted()


class Progress:
    """comfy.utils.ProgressBar when available, a no-op otherwise."""

    def __init__(self, total: int):
        self.bar = None
        try:
            import comfy.utils
            self.bar = comfy.utils.ProgressBar(int(total))
        except Exception:
            self.bar = None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)


# --------------------------------------------------------------------------- tensors

def mask_batch(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """MASK as [B, H, W] float32 in [0, 1] (accepts [H, W], [1, H, W], [B, H, W], [B, 1, H, W]; see unit_range)."""
    if not torch.is_tensor(mask):
        raise G4SegError(f"{name} is not a tensor (got {type(mask).__name__}); connect a MASK")
    if mask.dim() == 2:
        mask = mask[None]
    elif mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise G4SegError(f"{name} must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    if 0 in mask.shape:
        raise G4SegError(f"{name} is empty (shape {tuple(mask.shape)}): connect a mask with at least one pixel")
    return unit_range(mask.float(), name, "MASK")


# ComfyUI's bicubic resizes (ImageScale) overshoot [0, 1] by a few hundredths at sharp edges; data on another
# scale (0..255, -1..1) lies far outside. Within this margin values are clipped, as the flow clips its own resizes.
RESAMPLING_OVERSHOOT = 0.25


def unit_range(t: torch.Tensor, name: str, kind: str) -> torch.Tensor:
    """An IMAGE/MASK tensor checked to be finite and in [0, 1] (resampling overshoot clipped): other scales are
    refused naming the fix, never clipped into a wrong mask or picture."""
    if not torch.isfinite(t).all():
        raise G4SegError(f"{name} contains NaN or infinite values: check the node that produced it")
    lo, hi = float(t.min()), float(t.max())
    if lo < -RESAMPLING_OVERSHOOT or hi > 1 + RESAMPLING_OVERSHOOT:
        scale = "; it looks like 0..255: divide by 255" if lo >= 0 and hi > 10 else ""
        article = "an" if kind == "IMAGE" else "a"
        raise G4SegError(f"{name} has values in [{lo:.4g}, {hi:.4g}], outside [0, 1] (a ComfyUI {kind} holds "
                         f"0..1){scale}: connect {article} {kind} in [0, 1]")
    return t.clamp(0, 1)


def image_batch(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """IMAGE [B, H, W, C] -> float32 [B, H, W, 3] in [0, 1] (alpha dropped, grey repeated, uint8 / 255; see
    unit_range)."""
    if not torch.is_tensor(image) or image.dim() not in (3, 4):
        raise G4SegError(f"{name} must be an IMAGE [B, H, W, C], got {getattr(image, 'shape', type(image))}")
    if image.dim() == 3:
        image = image[None]
    if image.dtype == torch.uint8:  # 0..255 pixels, as the flow reads uint8 pictures
        image = image.float() / 255
    c = image.shape[-1]
    if c == 1:
        image = image.repeat(1, 1, 1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise G4SegError(f"{name} has {c} channels; G4Seg needs RGB images [B, H, W, 3]")
    if 0 in image.shape[:3]:
        raise G4SegError(f"{name} is empty (batch x height x width {tuple(image.shape[:3])}): connect an image "
                         "with at least one pixel")
    return unit_range(image.float(), name, "IMAGE")


def pair_batches(images: torch.Tensor, masks: torch.Tensor, *, image_name="image",
                 mask_name="mask") -> int:
    """Batch size of an (IMAGE, MASK) pair: equal sizes, or one side 1 (broadcast)."""
    bi, bm = images.shape[0], masks.shape[0]
    if bi != bm and bi != 1 and bm != 1:
        raise G4SegError(f"{image_name} batch ({bi}) and {mask_name} batch ({bm}) differ: "
                         "give one mask per image, or a single mask for all images")
    return max(bi, bm)


def pick(batch: torch.Tensor, i: int) -> torch.Tensor:
    return batch[i if batch.shape[0] > 1 else 0]


def check_same_size(mask_hw: Tuple[int, int], image_hw: Tuple[int, int], *, what: str = "mask",
                    resize_hint: str = "resize it (e.g. with ImageScale / an upscale-mask node) first") -> None:
    if tuple(mask_hw) != tuple(image_hw):
        raise G4SegError(f"{what} is {mask_hw[1]}x{mask_hw[0]} (WxH) but the image is "
                         f"{image_hw[1]}x{image_hw[0]}: {resize_hint}")


def resize_map(x: torch.Tensor, hw: Tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """[H, W] or [C, H, W] map to hw (bilinear, antialiased when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    squeeze = x.dim() == 2
    t = x[None, None] if squeeze else x[None]
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["antialias"] = True
    out = F.interpolate(t.float(), size=tuple(hw), mode=mode, **kwargs)
    return out[0, 0] if squeeze else out[0]


def image_to_chw(image_hwc: torch.Tensor) -> torch.Tensor:
    """One IMAGE [H, W, 3] -> [1, 3, H, W] (the core's convention)."""
    return image_hwc.permute(2, 0, 1)[None].float()


def image_to_mask(image_hwc: torch.Tensor, channel: str = "luminance") -> torch.Tensor:
    """[H, W, C] image -> [H, W] map."""
    if channel == "alpha":
        if image_hwc.shape[-1] < 4:
            raise G4SegError("channel 'alpha' needs an image with an alpha channel")
        return image_hwc[..., 3]
    rgb = image_hwc[..., :3] if image_hwc.shape[-1] >= 3 else image_hwc[..., :1].repeat(1, 1, 3)
    if channel == "red":
        return rgb[..., 0]
    if channel == "green":
        return rgb[..., 1]
    if channel == "blue":
        return rgb[..., 2]
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def stack_masks(masks: List[torch.Tensor]) -> torch.Tensor:
    """List of [H, W] -> [B, H, W] on the intermediate device (sizes must agree)."""
    sizes = {tuple(m.shape) for m in masks}
    if len(sizes) > 1:
        raise G4SegError(f"the masks of this batch have different sizes {sorted(sizes)}")
    return torch.stack([m.float() for m in masks]).to(intermediate_device())
