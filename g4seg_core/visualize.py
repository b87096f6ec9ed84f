"""Pictures a person looks at: mask overlays, before/after panels, correspondence arrows."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COARSE_COLOR = (255, 64, 64)
REFINED_COLOR = (64, 220, 64)


def overlay(image: np.ndarray, prob: np.ndarray, color=REFINED_COLOR, alpha: float = 0.45,
            threshold: float = 0.5) -> np.ndarray:
    """Tint the image where prob >= threshold and draw the mask's outline."""
    out = image.astype(np.float32).copy()
    fg = prob >= threshold
    out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(color, np.float32)
    edge = fg ^ _erode(fg)
    out[edge] = color
    return out.clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, mode="edge")
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


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


def correspondence_picture(original: np.ndarray, generated: np.ndarray, match: np.ndarray,
                           step: int = 4) -> Image.Image:
    """Original | generated, with a line from every `step`-th grid cell to its match."""
    h, w = original.shape[:2]
    canvas = Image.new("RGB", (w * 2, h))
    canvas.paste(Image.fromarray(original), (0, 0))
    canvas.paste(Image.fromarray(generated).resize((w, h)), (w, 0))
    draw = ImageDraw.Draw(canvas)
    gh, gw = match.shape
    for y in range(0, gh, step):
        for x in range(0, gw, step):
            j = int(match[y, x])
            ty, tx = divmod(j, gw)
            p0 = ((x + 0.5) * w / gw, (y + 0.5) * h / gh)
            p1 = (w + (tx + 0.5) * w / gw, (ty + 0.5) * h / gh)
            hue = (int(255 * x / max(1, gw - 1)), int(255 * y / max(1, gh - 1)), 160)
            draw.line([p0, p1], fill=hue, width=1)
    return canvas
