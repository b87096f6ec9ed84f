"""Several classes of one image: which classes are refined, one flow.refine_batch, one fused label map.

`g4seg segment --refine`, `g4seg eval`'s g4seg refiner and the G4SegRefineClasses node all call
`refine_classes`, so the same image, class maps and config give the same label map in all three.

The rule (the only one): a class is refined when its coarse map, cut at `config.threshold`, has both
foreground and background pixels, i.e. a boundary to move. A map that never reaches the threshold
(the class is absent) or reaches it everywhere is kept as it is and still takes part in the fusion.
The refined classes of the image form one refine_batch in the order given, so the k-th of them gets
the noise of seed + k (flow's batch rule); the fusion is label_maps.fuse_multiclass over every class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional

import numpy as np

from ..config import G4SegConfig
from ..errors import G4SegError
from . import flow
from .label_maps import fuse_multiclass
from .masks import validate_probability


@dataclass
class ClassRefinement:
    labels: np.ndarray  # fused label map uint8 [H, W], 0 = background, class_indices[name] elsewhere
    probs: Dict[str, np.ndarray]  # every class, in the given order: refined, or its coarse map (float32 [H, W])
    results: Dict[str, flow.RefineResult]  # the refined classes only
    class_indices: Dict[str, int]


def has_boundary(prob: np.ndarray, threshold: float) -> bool:
    """The rule: the map cut at `threshold` has foreground and background (something to refine)."""
    return bool((prob >= threshold).any() and (prob < threshold).any())


def refine_classes(backend: flow.Backend, image, masks: Mapping[str, object], config: Optional[G4SegConfig] = None,
                   class_indices: Optional[Mapping[str, int]] = None, context: Optional[flow.ImageContext] = None,
                   progress: Optional[Callable[[str], None]] = None) -> ClassRefinement:
    """Refine the classes of one image that the rule picks and fuse every class into a label map.

    `masks`: {class name: probability map [H, W]} (numpy or torch; one size for all). `class_indices`:
    {class name: label index 1..254}, default 1, 2, ... in the order given. `context`: a prepared
    image (flow.prepare_images) to reuse.
    """
    config = (config or G4SegConfig()).validate()
    if not masks:
        raise G4SegError("no class masks given: pass at least one {class name: probability map}")
    indices = dict(class_indices) if class_indices else {name: i + 1 for i, name in enumerate(masks)}
    missing = [name for name in masks if name not in indices]
    if missing:
        raise G4SegError(f"no class index given for {missing}")
    probs = {name: validate_probability(m, name=f"mask of class {name!r}") for name, m in masks.items()}
    chosen = [name for name, p in probs.items() if has_boundary(p, config.threshold)]
    results: Dict[str, flow.RefineResult] = {}
    if chosen:
        contexts = None if context is None else [context] * len(chosen)
        refined = flow.refine_batch(backend, [image] * len(chosen), [probs[n] for n in chosen], chosen, config,
                                    contexts=contexts, progress=progress)
        results = dict(zip(chosen, refined))
    out = {name: results[name].prob if name in results else p for name, p in probs.items()}
    labels = fuse_multiclass({indices[name]: p for name, p in out.items()}, bg_power=config.bg_power)
    return ClassRefinement(labels=labels, probs=out, results=results, class_indices=indices)

