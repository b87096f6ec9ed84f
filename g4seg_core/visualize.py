"""Pictures a person looks at: mask overlays and before/after panels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .metrics import erode_disk

COARSE_COLOR = (255, 64, 64)
REFINED_COLOR = (64, 220, 64)


def overlay(image: np.ndarray, prob: np.ndarray, color=REFINED_COLOR, alpha: float = 0.45,
            threshold: float = 0.5) -> np.ndarray:
    """Tint the image where prob >= threshold and draw the mask's outline."""
    out = image.astype(np.float32).copy()
    fg = prob >= threshold
    out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(color, np.float32)
    edge = fg ^ erode_disk(fg, 1)  # one-pixel outline; the image border is not an edge
    out[edge] = color
    return out.clip(0, 255).astype(np.uint8)


def before_after(image: np.ndarray, coarse: np.ndarray, refined: np.ndarray, threshold: float = 0.5,
                 max_height: int = 512, refined_title: str = "refined (G4Seg)") -> Image.Image:
    """Two panels side by side: coarse mask (red) | refined mask (green), with captions."""
    panels = [overlay(image, coarse, COARSE_COLOR, threshold=threshold),
              overlay(image, refined, REFINED_COLOR, threshold=threshold)]
    h, w = image.shape[:2]
    scale = min(1.0, max_height / h)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    caption = 18
    canvas = Image.new("RGB", (size[0] * 2 + 8, size[1] + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, ("coarse", refined_title))):
        x = i * (size[0] + 8)
        canvas.paste(Image.fromarray(panel).resize(size, Image.BILINEAR), (x, caption))
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
    return canvas
