"""The segmenter's knobs, declared once (knobs.KnobSet): ZeroShotConfig, the `g4seg segment` flags and
G4SegTextToMask's widgets all come from SEGMENTER_KNOBS, so the command line and the node accept the
same values. Defaults: the published NACLIP recipe.
"""

from __future__ import annotations

from typing import Optional

from ..knobs import Knob, KnobSet
from .neighbourhood import DEFAULT_SIGMA
from .vocabulary import TEMPLATE_SETS


def _stride_within_window(config) -> Optional[str]:
    if config.stride > config.window:
        return (f"stride={config.stride} > window={config.window}: windows would leave gaps; use a stride of at most "
                f"the window (recipe: half of it, {config.window // 2})")
    return None


SEGMENTER_KNOBS = KnobSet("segmenter setting", (
    Knob("short_side", "int", 336, "image resized so its shorter side is this many px (0: keep the image size); "
         "at most 4096 (the window logits of every query are held at this size)", min=0, max=4096, step=16),
    Knob("window", "int", 224, "sliding-window side, px; 32..1024 (at least two patches of a ViT-/16 per side)",
         min=32, max=1024, step=16),
    Knob("stride", "int", 112, "window step, px (windows overlap and are averaged); 8..1024 and at most the window "
         "(larger leaves gaps)", min=8, max=1024, step=8),
    Knob("logit_scale", "float", 40.0, "softmax temperature: logits = scale x cosine; 1..200 (the logits stay within "
         "+-200, far inside float32's exp range; an infinite scale makes the softmax NaN)", min=1.0, max=200.0,
         step=1.0),
    Knob("sigma", "float", DEFAULT_SIGMA, "neighbourhood width of the last block, patches; 0.1..50 (the Gaussian "
         "exp(-d^2 / 2 sigma^2) needs 2 sigma^2 > 0 in float32, below ~1e-23 it is 0/0 = NaN; past 50 it is flat "
         "over any patch grid)", min=0.1, max=50.0, step=0.1),
    Knob("background", "str", "voc", "background words: 'voc' (26 stuff words: sky, wall, tree, ...), 'none', or a "
         "comma-separated list"),
    Knob("prob_threshold", "float", 0.1, "pixels whose best class probability is below this become background "
         "(0: off)", min=0.0, max=1.0, step=0.01),
    Knob("templates", "choice", "imagenet80", "'imagenet80' (the recipe: 80 prompt templates averaged) or 'single' "
         "('a photo of a {}.': 80x less text-encoder work, for CPUs)", choices=tuple(TEMPLATE_SETS)),
    Knob("window_batch", "int", 8, "windows per vision-model call (memory vs speed; the result does not change)",
         min=1, max=64),
), rules=(_stride_within_window,))

ZeroShotConfig = SEGMENTER_KNOBS.make_config(
    "ZeroShotConfig", __name__, "Knobs of the words -> coarse-mask segmenter (SEGMENTER_KNOBS; validated on creation).")
