"""A seeded toy world: VOC-style scenes of a few shaped, coloured, textured objects.

Five object classes, each with its own shape, colour and texture, painted two to four per
image over textured backgrounds (stripes, checks, blobs, gradients, noise), later objects
occluding earlier ones. Every image comes with its ground-truth label map and the caption
"a photo of a {class}" of each object. Small images (128 px by default) so that the models
of tools/train_toyworld.py can be trained on a CPU, and G4Seg measured on them with
`g4seg eval` (docs/EVALUATION.md, "The toy world").

    write_voc_dataset("toy", num_train=400, num_val=200)   # toy/JPEGImages, SegmentationClass, ImageSets
    g4seg eval toy --split val --class-names toy/class_names.txt --num-classes 6 --protocol perturb-0.8 ...

Everything is a pure function of (seed, split, index): the same call writes the same files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np

# Index 0 is the background, as in VOC.
CLASS_NAMES = ("background", "ball", "box", "tent", "ring", "cross")
CAPTION = "a photo of a {}"
# What the toy text encoder learns for a scene without objects: one of the segmenter's stuff words
# (zeroshot.vocabulary.STUFF_WORDS), so `g4seg segment --background wall` has a trained background query
BACKGROUND_WORD = "wall"
SUPERSAMPLE = 2  # objects are drawn at 2x and averaged down: anti-aliased edges like a photo's
_SPLIT_CODES = {"train": 1, "val": 2, "clip": 3, "unet": 4, "vae": 5}

# Base colour per class (RGB 0..1): distinct hues, far from the muted backgrounds.
_COLOURS = {1: (0.85, 0.15, 0.12), 2: (0.15, 0.30, 0.90), 3: (0.15, 0.70, 0.20),
            4: (0.95, 0.80, 0.10), 5: (0.85, 0.20, 0.80)}


@dataclass
class Scene:
    image: np.ndarray        # uint8 [H, W, 3]
    labels: np.ndarray       # uint8 [H, W], 0 background, 1..5 the classes (visible pixels)
    objects: List[int]       # class of each painted object, painting order
    main: Optional[int]      # the class the scene is about (focus scenes), else None

    @property
    def classes(self) -> List[int]:
        return sorted(int(c) for c in np.unique(self.labels) if c != 0)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODES[split], int(index)]))


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Value noise: a random cells x cells grid bilinearly upsampled to size x size, in [0, 1]."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)
    a = grid[i][:, i] * (1 - f)[None, :] + grid[i][:, i + 1] * f[None, :]
    b = grid[i + 1][:, i] * (1 - f)[None, :] + grid[i + 1][:, i + 1] * f[None, :]
    return a * (1 - f)[:, None] + b * f[:, None]


def _background(rng, size: int) -> np.ndarray:
    """A muted textured background [S, S, 3] in [0, 1]."""
    base = rng.uniform(0.25, 0.6, 3) * rng.uniform(0.6, 1.0)
    grey = base.mean()
    base = grey + (base - grey) * 0.4  # low saturation: objects stand out by colour, not trivially by brightness
    other = np.clip(base + rng.normal(0, 0.12, 3), 0.05, 0.8)
    y, x = np.mgrid[0:size, 0:size] / size
    kind = rng.integers(0, 4)
    if kind == 0:  # stripes at a random angle
        a = rng.uniform(0, math.pi)
        freq = rng.uniform(4, 12)
        w = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(a) + y * math.sin(a)))
    elif kind == 1:  # checks
        n = rng.integers(3, 9)
        w = ((np.floor(x * n) + np.floor(y * n)) % 2).astype(float)
    elif kind == 2:  # blobs
        w = _smooth_noise(rng, size, int(rng.integers(3, 7)))
    else:  # gradient
        a = rng.uniform(0, 2 * math.pi)
        w = np.clip(0.5 + (x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a), 0, 1)
    img = base[None, None] * (1 - w[..., None]) + other[None, None] * w[..., None]
    img = img * (0.85 + 0.3 * _smooth_noise(rng, size, 4)[..., None])
    return np.clip(img, 0, 1)


def _shape(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of class `cls` in object coordinates (u, v rotated, centred; r the radius)."""
    d = np.hypot(u, v)
    if cls == 1:  # ball: disc
        return d < r
    if cls == 2:  # box: square
        return (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
    if cls == 3:  # tent: triangle pointing up (in object coordinates)
        h = r * 1.5
        return (v < 0.5 * r) & (v > -r) & (np.abs(u) < (v + r) / h * r * 1.05)
    if cls == 4:  # ring: annulus (background shows through the hole)
        return (d < r) & (d > 0.5 * r)
    if cls == 5:  # cross: plus sign
        arm = 0.33 * r
        return ((np.abs(u) < r) & (np.abs(v) < arm)) | ((np.abs(v) < r) & (np.abs(u) < arm))
    raise ValueError(cls)


def _texture(cls: int, rng, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Colour [.., 3] of class `cls` at object coordinates: each class its own texture."""
    base = np.clip(np.array(_COLOURS[cls]) * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, 3), 0, 1)
    ones = np.ones_like(u)[..., None]
    if cls == 1:  # shaded sphere with a highlight
        d = np.hypot(u + 0.35 * r, v + 0.35 * r) / r
        shade = np.clip(1.1 - 0.55 * np.hypot(u, v) / r, 0.4, 1.0)[..., None]
        return np.clip(base * shade + 0.8 * np.exp(-(d / 0.25) ** 2)[..., None], 0, 1)
    if cls == 2:  # stripes across the box
        s = (np.sin(u / r * 3 * math.pi) > 0)[..., None]
        return np.where(s, base * ones, base * 0.55 * ones)
    if cls == 3:  # checks
        n = r / 3
        c = ((np.floor(u / n) + np.floor(v / n)) % 2)[..., None]
        return base * (0.65 + 0.35 * c)
    if cls == 4:  # concentric bands
        return base * (0.8 + 0.2 * np.cos(np.hypot(u, v) / r * 4 * math.pi))[..., None]
    # cross: dotted
    dots = ((np.sin(u / r * 5 * math.pi) * np.sin(v / r * 5 * math.pi)) > 0.6)[..., None]
    return np.where(dots, np.clip(base + 0.35, 0, 1) * ones, base * ones)


def render_scene(rng: np.random.Generator, size: int = 128, main: Optional[int] = None) -> Scene:
    """One scene. main=None: 2-4 objects of random classes and sizes; main=c: a large object of class c
    near the centre with 0-2 smaller ones of other classes (the scenes the CLIP encoder learns from);
    main=0: the background alone (what BACKGROUND_WORD captions)."""
    hi = size * SUPERSAMPLE
    y, x = (np.mgrid[0:hi, 0:hi] + 0.5) / SUPERSAMPLE
    canvas = np.repeat(np.repeat(_background(rng, size), SUPERSAMPLE, 0), SUPERSAMPLE, 1)
    labels = np.zeros((hi, hi), np.uint8)
    n_classes = len(CLASS_NAMES) - 1
    if main == 0:
        objects, radii, centres = [], [], []
    elif main is None:
        objects = [int(c) for c in rng.integers(1, n_classes + 1, int(rng.integers(2, 5)))]
        radii = [rng.uniform(0.10, 0.24) * size for _ in objects]
        centres = [rng.uniform(0.12, 0.88, 2) * size for _ in objects]
    else:
        others = [c for c in range(1, n_classes + 1) if c != main]
        small = [int(c) for c in rng.choice(others, int(rng.integers(0, 3)), replace=False)]
        objects = small + [int(main)]  # the main object is painted last: never occluded
        radii = [rng.uniform(0.08, 0.14) * size for _ in small] + [rng.uniform(0.25, 0.38) * size]
        centres = [rng.uniform(0.1, 0.9, 2) * size for _ in small] + [rng.uniform(0.4, 0.6, 2) * size]
    for cls, r, (cx, cy) in zip(objects, radii, centres):
        a = rng.uniform(0, 2 * math.pi)
        u = (x - cx) * math.cos(a) + (y - cy) * math.sin(a)
        v = -(x - cx) * math.sin(a) + (y - cy) * math.cos(a)
        inside = _shape(cls, u, v, r)
        canvas[inside] = _texture(cls, rng, u[inside], v[inside], r)
        labels[inside] = cls
    image = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = np.clip(image + rng.normal(0, 0.015, image.shape), 0, 1)
    # the label of each pixel is the one drawn at its centre sample
    label_small = labels[SUPERSAMPLE // 2::SUPERSAMPLE, SUPERSAMPLE // 2::SUPERSAMPLE]
    return Scene((image * 255 + 0.5).astype(np.uint8), np.ascontiguousarray(label_small), objects, main)


def scene(seed: int, split: str, index: int, size: int = 128, main: Optional[int] = None) -> Scene:
    return render_scene(scene_rng(seed, split, index), size, main)


def caption(cls: int) -> str:
    return CAPTION.format(CLASS_NAMES[cls])


def write_voc_dataset(root, num_train: int = 400, num_val: int = 200, seed: int = 0, size: int = 128) -> Path:
    """Write a VOC-style folder `g4seg eval` reads unchanged; returns root.

    root/JPEGImages/<id>.png (PNG: no JPEG artefacts on 128 px images), root/SegmentationClass/<id>.png
    (VOC palette), root/ImageSets/Segmentation/{train,val}.txt, root/class_names.txt (background first,
    for --class-names), root/captions.txt ("<id>\\t<caption>" for each class present).
    """
    from PIL import Image

    from ..files.mask_files import save_label_map_png

    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    captions = []
    for split, count in (("train", num_train), ("val", num_val)):
        ids = []
        for i in range(count):
            sid = f"{split}_{i:05d}"
            s = scene(seed, split, i, size)
            Image.fromarray(s.image).save(root / "JPEGImages" / f"{sid}.png")
            save_label_map_png(s.labels, root / "SegmentationClass" / f"{sid}.png")
            ids.append(sid)
            captions += [f"{sid}\t{caption(c)}" for c in s.classes]
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(i + "\n" for i in ids))
    (root / "class_names.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
    (root / "captions.txt").write_text("".join(c + "\n" for c in captions))
    return root


# Coarse-mask protocols mixed over the images of a split (perturb.py): together they fill the paper's
# Table VII buckets (initial IoU 0-40, 40-80, 80-100); image i gets MIXED_PROTOCOLS[i % 6].
MIXED_PROTOCOLS = ("perturb-0.9", "perturb-0.8", "perturb-0.7", "lowres-8", "dilate-5", "erode-5")


def write_mixed_coarse(root, out, split: str = "val", seed: int = 0, limit: Optional[int] = None,
                       protocols=MIXED_PROTOCOLS) -> Path:
    """Coarse masks for `g4seg eval ROOT --coarse OUT`: one probability map per (image, class present),
    OUT/<id>_<class>.png (16-bit), made from the ground truth with protocols[i % len(protocols)] for the
    i-th image of the split and perturb.make_coarse's seed (the same seed `--protocol` would use).
    OUT/protocols.txt lists "<id>\t<protocol>"."""
    from ..files.mask_files import load_label_map, save_probability_png16
    from .perturb import derive_seed, make_coarse

    root, out = Path(root), Path(out)
    ids = (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    ids = ids[:limit] if limit else ids
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sid in enumerate(ids):
        protocol = protocols[i % len(protocols)]
        gt = np.asarray(load_label_map(str(root / "SegmentationClass" / f"{sid}.png"))).astype(np.int64)
        for c in sorted(int(v) for v in np.unique(gt) if 0 < v < 255):
            prob = make_coarse(gt == c, protocol, derive_seed(seed, sid, c), valid=gt != 255)
            save_probability_png16(np.clip(prob, 0, 1).astype(np.float32), out / f"{sid}_{CLASS_NAMES[c]}.png")
        lines.append(f"{sid}\t{protocol}")
    (out / "protocols.txt").write_text("".join(line + "\n" for line in lines))
    return out


def class_list_argument() -> str:
    """The object classes as `g4seg segment --classes` takes them."""
    return ", ".join(CLASS_NAMES[1:])


__all__ = ["CAPTION", "CLASS_NAMES", "Scene", "caption", "class_list_argument", "render_scene", "scene",
           "scene_rng", "write_mixed_coarse", "write_voc_dataset", "MIXED_PROTOCOLS"]

