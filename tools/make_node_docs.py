"""Write the per-node help pages ComfyUI's page shows (web/docs/<node id>.md) from the node declarations.

    python tools/make_node_docs.py

The page fetches /extensions/<pack folder>/docs/<node id>.md (WEB_DIRECTORY in __init__.py) when
the node's help is opened. Inputs, defaults, ranges and tooltips come from INPUT_TYPES, so rerun
this after changing a node; tests/test_install.py checks that every input is on its page.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

USAGE = {
    "G4SegLoadCoarseMask": "Upload the coarse mask with the button (or pick a file from ComfyUI's input folder), or "
                           "connect a MASK / IMAGE. The example workflows use `assets/cat_coarse.png` of this pack.",
    "G4SegRefine": "The whole method in one node. Connect a checkpoint loader (MODEL, CLIP, VAE), a CLIP Vision "
                   "loader, the image and the coarse mask. The node shows the coarse mask (red, left) next to the "
                   "refined one (green, right) on the image after each run.",
    "G4SegMixForeground": "After CLIP Correspondence; the node shows coarse (red, left) vs refined (green, right) on "
                          "the original image after each run.",
    "G4SegDenseCRF": "Needs `pip install pydensecrf2` in ComfyUI's Python. The node shows the input mask (red, left) "
                     "vs the CRF result (green, right) on the image after each run.",
}


def _describe(spec) -> str:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, (list, tuple)):
        text = "one of " + ", ".join(f"`{c}`" for c in kind) if kind else "a file name"
    else:
        text = kind
    extras = [f"{k} {opts[k]}" for k in ("default", "min", "max") if k in opts and opts[k] != ""]
    return text + (f" ({', '.join(extras)})" if extras else "")


def page(node_id: str, cls, display_name: str) -> str:
    lines = [f"# {display_name}", "", cls.DESCRIPTION, ""]
    if node_id in USAGE:
        lines += [USAGE[node_id], ""]
    lines += ["## Inputs", "", "| name | type | what |", "|---|---|---|"]
    declared = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            tip = opts.get("tooltip", "").replace("|", "\\|")
            lines.append(f"| `{name}`{' (optional)' if section == 'optional' else ''} | {_describe(spec)} | {tip} |")
    lines += ["", "## Outputs", "", "| name | type | what |", "|---|---|---|"]
    tips = getattr(cls, "OUTPUT_TOOLTIPS", ()) or ()
    names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
    for i, (name, kind) in enumerate(zip(names, cls.RETURN_TYPES)):
        lines.append(f"| `{name}` | {kind} | {tips[i] if i < len(tips) else ''} |")
    lines += ["", "More: docs/NODES.md of ComfyUI-G4Seg.", ""]
    return "\n".join(lines)


def main() -> None:
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    folder = os.path.join(ROOT, "web", "docs")
    os.makedirs(folder, exist_ok=True)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        path = os.path.join(folder, f"{node_id}.md")
        with open(path, "w") as f:
            f.write(page(node_id, cls, NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)))
        print(path)


if __name__ == "__main__":
    main()
