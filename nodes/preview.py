"""The before/after picture a node shows on itself (coarse in red | refined in green, on the image).

Nodes call `with_preview(result, images, coarse, refined, threshold)` on their finished outputs: the
picture is appended to the outputs as an IMAGE (`overlay`) and, inside ComfyUI, saved to the temp
folder and listed under "ui" so the page draws it in the node (as PreviewImage does).
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from .common import image_batch, intermediate_device, mask_batch, pick, resize_map

PREVIEW_HEIGHT = 512  # the picture is for looking at: large images are shown smaller


def _shown_size(hw) -> tuple:
    h, w = int(hw[0]), int(hw[1])
    scale = min(1.0, PREVIEW_HEIGHT / h)
    return max(1, round(h * scale)), max(1, round(w * scale))


def before_after_batch(images: Optional[torch.Tensor], coarse: torch.Tensor, refined: torch.Tensor,
                       threshold: float, refined_title: str = "refined (G4Seg)") -> torch.Tensor:
    """IMAGE [B, h, 2w + 8, 3]: per item, the coarse mask (red) | the refined mask (green) on the image.

    Masks may have any size with the image's aspect ratio; without an image the masks are drawn on grey."""
    from g4seg_core.files.visualize import before_after

    coarse, refined = mask_batch(coarse, "coarse"), mask_batch(refined, "refined")
    images = image_batch(images) if images is not None else None
    base_hw = tuple(images.shape[1:3]) if images is not None else tuple(refined.shape[1:])
    hw = _shown_size(base_hw)
    n = max(coarse.shape[0], refined.shape[0], images.shape[0] if images is not None else 1)
    out = []
    for i in range(n):
        if images is not None:
            img = resize_map(pick(images, i).permute(2, 0, 1).float(), hw).permute(1, 2, 0)
        else:
            img = torch.full((*hw, 3), 0.5)
        rgb = (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        before = resize_map(pick(coarse, i).float(), hw).cpu().numpy()
        after = resize_map(pick(refined, i).float(), hw).cpu().numpy()
        panel = before_after(rgb, before, after, threshold=float(threshold), max_height=hw[0],
                             refined_title=refined_title)
        out.append(torch.from_numpy(np.asarray(panel, dtype=np.float32) / 255.0))
    return torch.stack(out).to(intermediate_device())


def save_for_ui(pictures: torch.Tensor) -> list:
    """Save to ComfyUI's temp folder like PreviewImage; [] outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return []
    from PIL import Image

    temp = folder_paths.get_temp_directory()
    prefix = "G4Seg_preview_" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, temp, int(pictures.shape[2]), int(pictures.shape[1]))
    entries = []
    for i, picture in enumerate(pictures):
        filename = f"{name}_{counter + i:05}_.png"
        arr = (picture.cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, filename), compress_level=1)
        entries.append({"filename": filename, "subfolder": subfolder, "type": "temp"})
    return entries


def with_preview(result: tuple, images: Optional[torch.Tensor], coarse: torch.Tensor, refined: torch.Tensor,
                 threshold: float, refined_title: str = "refined (G4Seg)") -> dict:
    """A node's return value: outputs + the picture as the appended `overlay` output, shown in the node."""
    pictures = before_after_batch(images, coarse, refined, threshold, refined_title)
    return {"ui": {"images": save_for_ui(pictures)}, "result": tuple(result) + (pictures,)}
