"""ComfyUI-G4Seg: ComfyUI entry point.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS,
NODE_DISPLAY_NAME_MAPPINGS and WEB_DIRECTORY. Only ComfyUI (and our tests) import this
file: `pip install -e .`, pytest and the `g4seg` CLI use g4seg_core directly. So a failed
import is raised, never swallowed: ComfyUI then marks the pack IMPORT FAILED and logs the
cause, instead of showing red "missing" nodes with no reason.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # g4seg_core sits next to this file; appended so it shadows nothing
    sys.path.append(_HERE)

try:
    # always relative: inside ComfyUI a top-level `nodes` is ComfyUI's own nodes.py
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as exc:
    raise ImportError(f"ComfyUI-G4Seg cannot load its nodes: {exc}. Install the missing package into "
                      f"ComfyUI's Python ({sys.executable} -m pip install -r {os.path.join(_HERE, 'requirements.txt')}; "
                      "torch comes with ComfyUI)") from exc

# Page extension (old-layout migration) and per-node help pages (web/docs/<node id>.md).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
