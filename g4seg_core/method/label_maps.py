"""Label maps <-> per-class probability maps: picking one class, fusing several (CLIP-ES convention)."""

from __future__ import annotations

import math
import os
from typing import Mapping, Tuple, Union

import numpy as np

from ..errors import G4SegError
from .masks import as_numpy, validate_probability

IGNORE_INDEX = 255


def fuse_multiclass(probs: Mapping[int, np.ndarray], bg_power: float = 1.0) -> np.ndarray:
    """Fuse per-class maps into a label map (SPEC "Inputs and output", CLIP-ES convention).

    ``probs`` maps class index (1..254) -> probability [H, W]. The background channel is
    ``bg = (1 - max_c S_c) ** bg_power``; each pixel gets the argmax over
    [bg, S_c1, S_c2, ...] (background = index 0; ties go to the earlier channel, i.e.
    background first, then classes in ascending index). Returns uint8 [H, W].
    """
    if not probs:
        raise G4SegError("fuse_multiclass got no class maps; pass {class_index: probability map}")
    bg_power = float(bg_power)
    if not (math.isfinite(bg_power) and bg_power > 0):
        raise G4SegError(f"bg_power={bg_power}: use a number > 0 (default 1)")
    classes = []
    maps = []
    shape = None
    for cls in sorted(probs, key=lambda c: int(c)):
        if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
            raise G4SegError(f"class key {cls!r}: use integer class indices (e.g. VOC cat = 8)")
        c = int(cls)
        if not 1 <= c <= 254:
            raise G4SegError(f"class index {c}: use 1..254 (0 is background, 255 is ignore)")
        m = validate_probability(probs[cls], name=f"class {c} map")
        if shape is None:
            shape = m.shape
        elif m.shape != shape:
            raise G4SegError(f"class {c} map is {m.shape[1]}x{m.shape[0]} but class {classes[0]} "
                             f"map is {shape[1]}x{shape[0]} (width x height); resize them to the "
                             f"same size first")
        classes.append(c)
        maps.append(m)
    stack = np.stack(maps)  # [C, H, W]
    bg = (1.0 - stack.max(axis=0)) ** bg_power
    winner = np.argmax(np.concatenate([bg[None], stack]), axis=0)
    lut = np.array([0] + classes, dtype=np.uint8)
    return lut[winner]


def class_probability_from_label_map(labels, class_index: Union[int, str]) -> np.ndarray:
    """Binary float32 map (1 where ``labels == class_index``) from a label map.

    ``class_index`` is an index or a VOC class name. Ignore pixels (255) count as 0 (not
    this class): they are usually object borders or unlabelled pixels, and refinement
    decides them from the image. Asking for class 255 itself is an error.
    """
    from ..files.palettes import parse_class_choice

    arr = as_numpy(labels)
    if arr.ndim != 2:
        raise G4SegError(f"label map has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    return (arr == parse_class_choice(class_index)).astype(np.float32)


# A greyscale file with more distinct values than this is a soft mask, not class indices.
_MAX_LABEL_VALUES = 64


def class_probability_from_file(path, class_choice: Union[int, str]) -> Tuple[np.ndarray, str]:
    """(binary map of one class, description) from a label-map file; the class must be present.

    A greyscale image that holds many grey levels, or only 0 and 255, is a mask or a probability
    map, not a label map: that is said instead of "class not found" or an empty mask.
    """
    from ..files.image_files import file_mode
    from ..files.mask_files import load_label_map
    from ..files.palettes import VOC_CLASSES, parse_class_choice

    path = os.fspath(path)
    idx = parse_class_choice(class_choice)
    labels = load_label_map(path)
    present = [int(v) for v in np.unique(labels)]
    prob = class_probability_from_label_map(labels, idx)
    name = VOC_CLASSES[idx] if idx < len(VOC_CLASSES) else f"class {idx}"
    greyscale = not path.lower().endswith(".npy") and file_mode(path, "label map") not in ("P", "PA")
    if greyscale and (len(present) > _MAX_LABEL_VALUES or (set(present) <= {0, IGNORE_INDEX} and not prob.any())):
        kind = "a binary 0/255 mask" if set(present) <= {0, IGNORE_INDEX} else \
            f"a greyscale mask with {len(present)} grey levels"
        raise G4SegError(f"{path!r} is {kind}, not a label map of class indices: refine it as a mask, without a "
                         f"class (CLI: leave out --mask-class; node: mask_kind 'probability')")
    if not prob.any():
        shown = ", ".join(f"{v} ({VOC_CLASSES[v]})" if v < len(VOC_CLASSES) else str(v)
                          for v in present if v != IGNORE_INDEX)
        raise G4SegError(f"label map {path!r} has no pixel of class {idx} ({name}); the classes in it are: "
                         f"{shown or 'none (only ignore pixels)'}. Pick one of those")
    return prob, f"label map, class {idx} ({name})"
