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


if __package__:
    # ComfyUI imports this folder as a package (whatever its name). pytest imports this file on its own,
    # as a module without a package, when the folder's name is not a Python identifier (a clone named
    # ComfyUI-G4Seg): there is nothing to register then, and the tests import `nodes` themselves.
    try:
        _register_core()
        # always relative: inside ComfyUI a top-level `nodes` is ComfyUI's own nodes.py
        from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    except ImportError as exc:
        raise ImportError(f"ComfyUI-G4Seg cannot load its nodes: {exc}. Install the missing package into "
                          f"ComfyUI's Python ({sys.executable} -m pip install -r "
                          f"{os.path.join(_HERE, 'requirements.txt')}; torch comes with ComfyUI)") from exc

# Page extension (old-layout migration) and per-node help pages (web/docs/<node id>.md).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
