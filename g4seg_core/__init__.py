"""G4Seg: refine an inexact segmentation mask with a pretrained Stable Diffusion model (no ComfyUI needed).

    from g4seg_core import G4SegConfig, G4SegPipeline
    pipe = G4SegPipeline.from_pretrained("v2-1_512-ema-pruned.safetensors", clip="clip_vision_h.safetensors")
    result = pipe.refine(image, coarse_mask, "cat", G4SegConfig())       # result.prob, result.binary
    classes = pipe.refine_classes(image, {"cat": m1, "sofa": m2})        # classes.labels, classes.probs

The public names below are loaded on first use, so `import g4seg_core` stays light: ComfyUI's
node pack imports it without diffusers, transformers or open_clip. The folders: docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_PUBLIC = {
    "G4SegError": "errors", "ModelNotFoundError": "errors",
    "G4SegConfig": "config",
    "G4SegPipeline": "pipeline",
    "RefineResult": "method.flow", "refine_batch": "method.flow",
    "ClassRefinement": "method.multiclass", "refine_classes": "method.multiclass",
    "ZeroShotConfig": "zeroshot", "ZeroShotSegmenter": "zeroshot", "ZeroShotResult": "zeroshot",
    "load_segmenter": "zeroshot",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'g4seg_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
