"""Draw a shipped workflow's graph as its same-name .jpg thumbnail (960x540).

    python tools/render_workflow_thumbnail.py example_workflows/g4seg_refine_densecrf.json [...]

Nodes are boxes at their canvas positions (ours highlighted), links are coloured by type.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = (960, 540)
MARGIN, TITLE_H, BOX = 20, 40, (152, 36)
LINK_COLOURS = {"MODEL": (230, 110, 110), "CLIP": (240, 210, 90), "VAE": (230, 120, 180),
                "CLIP_VISION": (220, 220, 220), "IMAGE": (100, 160, 240), "MASK": (120, 220, 120),
                "LATENT": (240, 150, 220), "CONDITIONING": (240, 170, 90), "CONTROL_NET": (80, 200, 200)}


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def render(workflow_path: Path) -> Path:
    workflow = json.loads(workflow_path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    xs = [n["pos"][0] for n in nodes.values()]
    ys = [n["pos"][1] for n in nodes.values()]
    span_x, span_y = max(max(xs) - min(xs), 1), max(max(ys) - min(ys), 1)
    scale = min((SIZE[0] - 2 * MARGIN - BOX[0]) / span_x, (SIZE[1] - TITLE_H - 2 * MARGIN - BOX[1]) / span_y)

    def corner(node):
        return (MARGIN + (node["pos"][0] - min(xs)) * scale,
                TITLE_H + MARGIN + (node["pos"][1] - min(ys)) * scale)

    canvas = Image.new("RGB", SIZE, (32, 34, 40))
    draw = ImageDraw.Draw(canvas)
    title = workflow.get("extra", {}).get("g4seg", {}).get("title", workflow_path.stem)
    draw.text((MARGIN, 14), title, fill=(240, 240, 240), font=_font(20))
    for _, src, _, dst, _, kind in workflow["links"]:
        sx, sy = corner(nodes[src])
        dx, dy = corner(nodes[dst])
        draw.line([(sx + BOX[0], sy + BOX[1] / 2), (dx, dy + BOX[1] / 2)],
                  fill=LINK_COLOURS.get(kind, (180, 180, 180)), width=2)
    for node in nodes.values():
        x, y = corner(node)
        ours, note = node["type"].startswith("G4Seg"), node["type"] in ("Note", "MarkdownNote")
        fill, outline = ((72, 60, 120), (200, 180, 255)) if ours else ((58, 62, 72), (150, 150, 160))
        if note:  # the "Start here" note, in the page's note colours
            fill, outline = (102, 85, 51), (220, 190, 120)
        draw.rounded_rectangle([x, y, x + BOX[0], y + BOX[1]], radius=4, fill=fill, outline=outline, width=2)
        draw.text((x + 6, y + 6), node.get("title", node["type"]) if note else node["type"], fill=(240, 240, 240),
                  font=_font(13))
    out = workflow_path.with_suffix(".jpg")
    canvas.save(out, quality=90)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(render(Path(arg)))
