"""Pictures a person looks at: mask overlays and before/after panels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..evaluation.metrics import erode_disk

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
    """Two panels side by side: coarse mask (red) | refined mask (green), with captions. The masks may have any
    size with the image's aspect ratio (refine keeps the mask's): they are drawn resized to the image."""
    from ..method.masks import resize_probability

    coarse, refined = (resize_probability(m, image.shape[:2]) if np.shape(m) != image.shape[:2] else m
                       for m in (coarse, refined))
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


def label_overlay(image: np.ndarray, labels: np.ndarray, names, title: str = "", alpha: float = 0.5,
                  max_height: int = 768) -> Image.Image:
    """The image tinted with the label map's VOC palette colours (0 = background untinted), a legend below."""
    from .palettes import voc_palette

    palette = voc_palette().astype(np.float32)
    out = image.astype(np.float32).copy()
    fg = labels > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * palette[labels[fg]]
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    h, w = labels.shape
    scale = min(1.0, max_height / h)
    picture = picture.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BILINEAR)
    row = 16
    entries = [(0, "background")] + [(k + 1, name) for k, name in enumerate(names)]
    per_line = max(1, picture.width // 150)
    lines = (len(entries) + per_line - 1) // per_line + (1 if title else 0)
    canvas = Image.new("RGB", (picture.width, picture.height + row * lines + 4), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = picture.height + 2
    if title:
        draw.text((4, y), title, fill=(200, 0, 0))
        y += row
    for i, (label, name) in enumerate(entries):
        x, yy = 4 + (i % per_line) * 150, y + (i // per_line) * row
        color = tuple(int(c) for c in palette[label])
        draw.rectangle([x, yy + 2, x + 11, yy + 13], fill=color, outline=(0, 0, 0))
        draw.text((x + 16, yy + 2), f"{label} {name}"[:22], fill=(0, 0, 0))
    return canvas
