"""Dense zero-shot segmentation: an image and class names -> per-class probabilities and a label map.

The recipe (SPEC "Words -> coarse mask"; NACLIP / SCLIP evaluation protocol):
  1. the image is resized so its shorter side is `short_side` (336);
  2. windows of `window` px (224) slide with `stride` (112), the last row/column flush with the
     border; each window gives NACLIP patch embeddings, logits = `logit_scale` (40) · cos(patch, query)
     upsampled bilinearly to the window; overlapping windows are averaged;
  3. the averaged logits are upsampled bilinearly to the image, softmax over all queries
     (every synonym of every class and every background word);
  4. a class's probability is the max over its synonyms' probabilities; background's the max over
     the background words'; the label map is the argmax (0 = background, k = k-th class), and
     pixels whose best probability is below `prob_threshold` (0.1) become background.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import G4SegError
from ..knobs import check_finite
from .config import ZeroShotConfig
from .text import QueryEmbeddings, check_widths
from .vocabulary import ClassList, parse_classes, template_set


def sliding_windows(height: int, width: int, window: int, stride: int) -> List[Tuple[int, int, int, int]]:
    """(top, bottom, left, right) of each window; the last ones flush with the border; one window
    (the whole side) when a side is shorter than the window."""
    def starts(size):
        if size <= window:
            return [(0, size)]
        count = (size - window + stride - 1) // stride + 1
        return [(min(i * stride, size - window), min(i * stride, size - window) + window) for i in range(count)]

    return [(t, b, l, r) for t, b in starts(height) for l, r in starts(width)]


# Limits checked before any work (plan): the window logits of every query are held at the working size,
# so its area is bounded (the largest square short_side allows); the windows are bounded so that no
# setting runs for hours unannounced (the defaults need 6 windows for a 4:3 photo).
MAX_WORK_PIXELS = 4096 * 4096
MAX_WINDOWS = 20_000


def window_count(size: int, window: int, stride: int) -> int:
    """Windows along one side (as sliding_windows lays them)."""
    return 1 if size <= window else (size - window + stride - 1) // stride + 1


def plan(config: ZeroShotConfig, height: int, width: int) -> Tuple[Tuple[int, int], int]:
    """(working size (h, w), number of windows) of a height x width image; a G4SegError naming the fix when
    the image is empty, its working size is over MAX_WORK_PIXELS (extreme aspect ratios) or it needs more
    than MAX_WINDOWS windows. Cheap: run it on every image before the models load."""
    if height < 1 or width < 1:
        raise G4SegError(f"image is empty ({width}x{height} px)")
    side = config.short_side
    if side:
        scale = side / min(height, width)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
    else:
        size = (height, width)
    h, w = size
    if h * w > MAX_WORK_PIXELS:
        fit = int((MAX_WORK_PIXELS * min(height, width) / max(height, width)) ** 0.5) // 16 * 16
        fix = (f"use short_side (--short-side) {fit} or less, or crop the image" if fit >= 32
               else "crop the image (its aspect ratio is too extreme for any short_side)")
        raise G4SegError(f"a {width}x{height} image at short_side {side} is segmented at {w}x{h} px, over the "
                         f"{MAX_WORK_PIXELS / 1e6:.1f} Mpx the segmenter holds its logits at: {fix}")
    windows = window_count(h, config.window, config.stride) * window_count(w, config.window, config.stride)
    if windows > MAX_WINDOWS:
        raise G4SegError(f"{windows} windows ({config.window} px every {config.stride} px over {w}x{h} px) is over "
                         f"the {MAX_WINDOWS} the segmenter runs: raise stride (--stride; recipe: half the window) "
                         "or lower short_side (--short-side)")
    return size, windows


@dataclass
class ZeroShotResult:
    """probs: [K, H, W] per class (in the given order); background: [H, W]; labels: [H, W] uint8."""

    classes: ClassList
    probs: np.ndarray
    background: np.ndarray
    labels: np.ndarray
    config: ZeroShotConfig
    windows: int
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> Tuple[str, ...]:
        return self.classes.classes

    def summary(self) -> dict:
        counts = np.bincount(self.labels.ravel(), minlength=len(self.names) + 1)
        total = float(self.labels.size)
        return {"classes": list(self.names), "synonyms": [list(s) for s in self.classes.synonyms],
                "background_words": list(self.classes.background),
                "background_words_dropped": list(self.classes.dropped_background),
                "label_fractions": {name: round(float(c) / total, 6)
                                    for name, c in zip(("background",) + self.names, counts)},
                "windows": self.windows, "timings_s": {k: round(v, 4) for k, v in self.timings.items()}}


class ZeroShotSegmenter:
    """NACLIP features (a DenseCLIPFeatures-like callable) + a text tower -> `segment(image, classes)`.

    Args:
        features: callable images [B, 3, h, w] in [0, 1] -> L2-normalised [B, D, h/p, w/p]
            (`neighbourhood.from_open_clip` / `from_transformers`, or the ComfyUI adapter).
        text: callable prompts -> [N, D] projected text embeddings, or a `QueryEmbeddings`.
        config: ZeroShotConfig.
    """

    def __init__(self, features, text, config: Optional[ZeroShotConfig] = None):
        self.features = features
        self.text = text if isinstance(text, QueryEmbeddings) else QueryEmbeddings(text, getattr(text, "name", "text"))
        self.config = config or ZeroShotConfig()
        self.checked_width = False

    def query_embeddings(self, classes: ClassList) -> Tuple[torch.Tensor, torch.Tensor]:
        """([Q, D] unit query embeddings, [Q] label of each query: 0 background, k class k)."""
        queries = classes.queries
        emb = self.text([w for w, _ in queries], template_set(self.config.templates))
        return emb, torch.tensor([label for _, label in queries])

    def _window_logits(self, image: torch.Tensor, text: torch.Tensor, progress: Optional[Callable]):
        """Averaged window logits [Q, h, w] of one [1, 3, h, w] image at the working size.

        Up to `window_batch` windows go through the vision model in one call, and their logits are
        computed, resized and summed as one batch on the model's device (one copy to the host at
        the end, no device round trip per window)."""
        c = self.config
        _, _, h, w = image.shape
        windows = sliding_windows(h, w, c.window, c.stride)
        total = count = queries = None
        for start in range(0, len(windows), c.window_batch):
            group = windows[start:start + c.window_batch]
            crops = [image[:, :, t:b, l:r] for t, b, l, r in group]
            # equal-sized windows go through the model together; odd ones (small images) one by one
            if len({(b - t, r - l) for t, b, l, r in group}) == 1:
                batches = [(group, torch.cat(crops))]
            else:
                batches = [([window], crop) for window, crop in zip(group, crops)]
            for members, pixels in batches:
                feats = self.features(pixels).float()  # [G, D, gh, gw] on the model's device
                if total is None:
                    if not self.checked_width:
                        check_widths(text.shape[1], feats.shape[1], getattr(self.text, "name", "text encoder"),
                                     getattr(self.features, "name", "CLIP vision model"))
                        self.checked_width = True
                    queries = text.to(feats.device, torch.float32)
                    total = torch.zeros(text.shape[0], h, w, device=feats.device)
                    count = torch.zeros(1, h, w, device=feats.device)
                t, b, l, r = members[0]
                logits = c.logit_scale * torch.einsum("gdhw,qd->gqhw", feats, queries)
                logits = F.interpolate(logits, size=(b - t, r - l), mode="bilinear", align_corners=False)
                for (t, b, l, r), window_logits in zip(members, logits):
                    total[:, t:b, l:r] += window_logits
                    count[:, t:b, l:r] += 1
            if progress is not None:
                progress(len(group))
        return (total / count).cpu(), len(windows)

    @torch.no_grad()
    def segment(self, image, classes, progress: Optional[Callable[[int], None]] = None,
                row_chunk: int = 512) -> ZeroShotResult:
        """Segment one image.

        Args:
            image: HxWx3 uint8 array / PIL image, or a float tensor [3, H, W] / [1, 3, H, W] in [0, 1].
            classes: a ClassList, or a string like 'cat, sofa|couch, person' (background from the config).
            progress: called with the number of windows done after each vision-model call.
            row_chunk: output rows upsampled at a time (bounds memory on large images; same result).
        """
        c = self.config
        timings = {}
        start = time.perf_counter()
        if not isinstance(classes, ClassList):
            classes = parse_classes(classes, c.background)
        pixels = _as_chw(image)
        height, width = pixels.shape[-2:]
        plan(c, height, width)  # limits first, before the text work
        text, query_labels = self.query_embeddings(classes)
        timings["text"] = time.perf_counter() - start

        start = time.perf_counter()
        size, _ = plan(c, height, width)
        work = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False,
                             antialias=True).clamp(0, 1) if size != (height, width) else pixels[None]
        logits, n_windows = self._window_logits(work, text, progress)
        check_finite(logits, "the segmenter's window logits (vision)", {"logit_scale": c.logit_scale, "sigma": c.sigma},
                     "move them towards the recipe (40, 5), or compute the CLIP in float32 (--dtype float32)")
        timings["vision"] = time.perf_counter() - start

        start = time.perf_counter()
        probs, best = _class_probabilities(logits, query_labels, len(classes.classes), (height, width), row_chunk)
        check_finite(probs, "the segmenter's probabilities (upsample)", {"logit_scale": c.logit_scale})
        labels = probs.argmax(dim=0)
        labels[best < c.prob_threshold] = 0
        timings["upsample"] = time.perf_counter() - start
        return ZeroShotResult(classes=classes, probs=probs[1:].numpy(), background=probs[0].numpy(),
                              labels=labels.to(torch.uint8).numpy(), config=c, windows=n_windows, timings=timings)


def _class_probabilities(logits: torch.Tensor, query_labels: torch.Tensor, n_classes: int,
                         size_hw: Tuple[int, int], row_chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[Q, h, w] logits -> ([1+K, H, W] merged probabilities, [H, W] best probability).

    Bilinear upsampling is separable: the rows are resampled first ([Q, H, w], never more than the
    working or the output size times Q), then the columns of `row_chunk` output rows at a time, each
    pass an F.interpolate along one axis (the other keeps its size, so it is copied exactly). No
    [Q, H, W] tensor of the whole image and no dense resampling matrix (a 10000x20 image needed 6.7 GB).
    """
    q, h, w = logits.shape
    height, width = size_hw
    by_rows = F.interpolate(logits[None], size=(height, w), mode="bilinear", align_corners=False)[0]
    out = torch.zeros(n_classes + 1, height, width)
    members = [(label, (query_labels == label).nonzero().flatten()) for label in range(n_classes + 1)]
    for top in range(0, height, row_chunk):
        rows = by_rows[None, :, top:top + row_chunk]
        chunk = F.interpolate(rows, size=(rows.shape[2], width), mode="bilinear", align_corners=False)[0]
        chunk = chunk.softmax(dim=0)
        for label, queries in members:
            if len(queries):
                out[label, top:top + row_chunk] = chunk[queries].amax(dim=0)
    return out, out.amax(dim=0)


def _as_chw(image) -> torch.Tensor:
    """[3, H, W] float in [0, 1] from a PIL image, HxWx3 uint8 array or a float tensor."""
    if torch.is_tensor(image):
        x = image.detach().float().cpu()
        if x.dim() == 4:
            if x.shape[0] != 1:
                raise G4SegError(f"segment takes one image at a time, got a batch of {x.shape[0]}")
            x = x[0]
        if x.dim() != 3 or x.shape[0] != 3:
            raise G4SegError(f"image tensor must be [3, H, W] in [0, 1], got {tuple(image.shape)}")
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise G4SegError(f"image must be RGB HxWx3, got shape {arr.shape}")
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float()  # a copy: PIL arrays are read-only
        if arr.dtype == np.uint8:
            x = x / 255.0
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise G4SegError(f"image is empty ({x.shape[2]}x{x.shape[1]} px)")
    if not torch.isfinite(x).all():
        raise G4SegError("image contains NaN or infinite values")
    return x.clamp(0, 1)
