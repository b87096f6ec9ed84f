"""ComfyUI-G4Seg: ComfyUI entry point.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS /
NODE_DISPLAY_NAME_MAPPINGS. Outside ComfyUI (pytest, `pip install`, the `g4seg` CLI)
importing it must never fail: if the node modules cannot be imported (e.g. torch is
missing) the mappings are empty and the reason is kept in IMPORT_ERROR.
"""

import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # g4seg_core sits next to this file; appended so it shadows nothing
    sys.path.append(_HERE)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
IMPORT_ERROR = None

try:
    # always relative: inside ComfyUI a top-level `nodes` is ComfyUI's own nodes.py
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
except Exception as exc:  # never break the host application
    IMPORT_ERROR = exc
    logging.getLogger(__name__).warning("ComfyUI-G4Seg nodes are unavailable: %s", exc)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
