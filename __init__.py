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


def _register_core() -> None:
    """Make the engine next to this file importable as `g4seg_core` (the nodes import it by that name)
    without putting this folder on sys.path, which would expose tests, tools, bench as top-level names."""
    if "g4seg_core" in sys.modules:  # already imported (tests, or the pip-installed CLI package)
        return
    import importlib.util

    folder = os.path.join(_HERE, "g4seg_core")
    spec = importlib.util.spec_from_file_location("g4seg_core", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules["g4seg_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["g4seg_core"]
        raise


_register_core()

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
