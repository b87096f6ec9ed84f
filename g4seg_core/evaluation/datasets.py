"""VOC-style evaluation data: images, ground-truth label maps and coarse masks.

Layout (PASCAL VOC 2012 and anything shaped like it)::

    ROOT/JPEGImages/<id>.jpg            (or .png/.jpeg/.bmp/.webp)
    ROOT/SegmentationClass/<id>.png     palette (or grey) label maps, 255 = ignore
    ROOT/ImageSets/Segmentation/<split>.txt   optional list of ids

Coarse masks (``--coarse DIR``), either per image or per class, detected per file:

    DIR/<id>.png                 a label map (palette or grey PNG, or .npy)
    DIR/<id>_<class>.png         one probability map per class (8/16-bit PNG or .npy);
                                 <class> is a class name (``cat``, ``potted_plant``) or index

or no folder and a synthetic ``protocol`` (perturb.make_coarse) applied to every class of
the ground truth with the seed ``derive_seed(seed, id, class)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import G4SegError
from ..files.image_files import IMAGE_EXTS, MASK_EXTS
from ..method.masks import resize_probability
from .perturb import derive_seed, make_coarse, parse_protocol


# Prompt-friendly spellings of the VOC names (the class name goes into "a photo of a {}").
PROMPT_NAMES = {"aeroplane": "aeroplane", "diningtable": "dining table",
                "pottedplant": "potted plant", "tvmonitor": "tv monitor", "motorbike": "motorbike"}


def default_class_names(num_classes: int) -> List[str]:
    from ..files.palettes import VOC_CLASSES

    names = list(VOC_CLASSES[:num_classes])
    names += [f"class{i}" for i in range(len(names), num_classes)]
    return names


def read_class_names(path: str) -> List[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise G4SegError(f"cannot read --class-names {path}: {exc}") from None
    names = [ln.strip() for ln in lines if ln.strip()]
    if len(names) < 2:
        raise G4SegError(f"--class-names {path}: need one class name per line, background first")
    return names


def load_rgb(path: Path) -> np.ndarray:
    """The picture as uint8 RGB (16-bit and float images scaled, greyscale repeated: image_files)."""
    from ..files.image_files import read_rgb

    return read_rgb(path).pixels


def load_labels(path: Path) -> np.ndarray:
    """A label map as uint8/int [H, W] (palette indices, grey values, or .npy)."""
    from ..files import mask_files

    return np.asarray(mask_files.load_label_map(str(path)))


def load_prob(path: Path) -> np.ndarray:
    from ..files import mask_files

    return np.asarray(mask_files.load_probability(str(path)), dtype=np.float32)


def resize_labels(labels: np.ndarray, size_hw) -> np.ndarray:
    if labels.shape == tuple(size_hw):
        return labels
    im = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(im.resize((size_hw[1], size_hw[0]), Image.NEAREST))


@dataclass
class LoadedSample:
    id: str
    image: np.ndarray                 # uint8 [H, W, 3]
    gt: np.ndarray                    # int [H, W], ignore_index where unlabelled
    coarse: Dict[int, np.ndarray]     # class -> float32 [H, W], the classes to refine
    image_path: str
    gt_path: str
    labels: Dict[int, str] = field(default_factory=dict)  # class -> prompt name


class VOCStyleDataset:
    def __init__(self, root, split: Optional[str] = None, image_dir: str = "JPEGImages",
                 gt_dir: str = "SegmentationClass", coarse_dir: Optional[str] = None,
                 protocol: Optional[str] = None, seed: int = 0, num_classes: int = 21,
                 class_names: Optional[Sequence[str]] = None, ignore_index: int = 255,
                 classes_from: str = "coarse", limit: Optional[int] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise G4SegError(f"dataset folder {self.root} does not exist")
        if (coarse_dir is None) == (protocol is None):
            raise G4SegError("give exactly one of --coarse DIR (coarse masks on disk) or "
                             "--protocol NAME (synthetic coarse masks from the ground truth, e.g. perturb-0.8)")
        if protocol is not None:
            parse_protocol(protocol)  # validates
        if classes_from not in ("coarse", "gt"):
            raise G4SegError(f"classes_from={classes_from!r}: choose 'coarse' or 'gt'")
        self.protocol = protocol
        self.seed = int(seed)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        if not 2 <= self.num_classes <= 255:  # 8-bit label maps: 0 background, at least one class
            raise G4SegError(f"--num-classes {self.num_classes}: use 2..255 (background and the classes)")
        if 0 <= self.ignore_index < self.num_classes:  # that class would leave every score without a word
            raise G4SegError(f"--ignore-index {self.ignore_index} is one of the {self.num_classes} classes "
                             f"(0..{self.num_classes - 1}): use the label of unlabelled pixels (VOC: 255)")
        if limit is not None and int(limit) < 1:
            raise G4SegError(f"--limit {limit}: use 1 or more (the first N ids), or leave it out for all")
        self.class_names = list(class_names) if class_names else default_class_names(self.num_classes)
        if len(self.class_names) != self.num_classes:
            raise G4SegError(f"{len(self.class_names)} class names for {self.num_classes} classes: "
                             "make --class-names and --num-classes agree")
        self.classes_from = classes_from
        self.image_dir = self.root / image_dir
        self.gt_dir = self.root / gt_dir
        for d, flag in ((self.image_dir, "--images-dir"), (self.gt_dir, "--gt-dir")):
            if not d.is_dir():
                raise G4SegError(f"{d} does not exist: a VOC-style folder needs {d.name}/ ({flag})")
        self.coarse_dir = Path(coarse_dir) if coarse_dir else None
        if self.coarse_dir is not None and not self.coarse_dir.is_dir():
            raise G4SegError(f"coarse-mask folder {self.coarse_dir} does not exist")
        self.split = split
        self.ids = self._list_ids(split)
        if limit is not None:
            self.ids = self.ids[: int(limit)]
        self._clashes: Dict[str, List[str]] = {}  # id -> files that claim the same role
        self._images = self._index(self.image_dir, IMAGE_EXTS)
        self._gts = self._index(self.gt_dir, MASK_EXTS)
        missing = [i for i in self.ids if i not in self._images or i not in self._gts]
        if missing:
            raise G4SegError(f"{len(missing)} id(s) lack an image in {self.image_dir} or a label map in "
                             f"{self.gt_dir}: {', '.join(missing[:5])}")
        self._coarse_maps: Dict[str, Path] = {}
        self._coarse_probs: Dict[str, Dict[int, Path]] = {}
        if self.coarse_dir is not None:
            self._index_coarse()

    # -- listing
    def _list_ids(self, split: Optional[str]) -> List[str]:
        if split:
            candidates = [Path(split), self.root / "ImageSets" / "Segmentation" / f"{split}.txt"]
            for c in candidates:
                if c.is_file():
                    ids = [ln.strip().split()[0] for ln in c.read_text().splitlines() if ln.strip()]
                    if not ids:
                        raise G4SegError(f"split file {c} is empty")
                    return ids
            raise G4SegError(f"split {split!r} not found: looked for {candidates[1]} (or a .txt path)")
        ids = sorted({p.stem for p in self.gt_dir.iterdir() if p.suffix.lower() in MASK_EXTS})
        if not ids:
            raise G4SegError(f"no label maps ({', '.join(MASK_EXTS)}) in {self.gt_dir}")
        return ids

    def _index(self, folder: Path, exts) -> Dict[str, Path]:
        out: Dict[str, Path] = {}
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in exts:
                if p.stem in out:  # x.jpg + x.png: which one is meant? said for that id, never guessed
                    self._clashes.setdefault(p.stem, []).append(f"{out[p.stem].name} and {p.name} in {folder}")
                    continue
                out[p.stem] = p
        return out

    def class_index(self, text: str) -> Optional[int]:
        t = text.strip()
        if t.isdigit():
            i = int(t)
            return i if 0 <= i < self.num_classes else None
        norm = t.lower().replace("-", " ").replace("_", " ")
        for i, name in enumerate(self.class_names):
            n = name.lower().replace("-", " ").replace("_", " ")
            if norm == n or norm.replace(" ", "") == n.replace(" ", ""):
                return i
        if self.class_names == default_class_names(21):  # VOC: accept aliases (tv, airplane...)
            try:
                from ..files.palettes import voc_class_index

                i = voc_class_index(t)
                return i if i < self.num_classes else None
            except G4SegError:
                return None
        return None

    def _index_coarse(self) -> None:
        ids = set(self.ids)
        unknown = []
        for p in sorted(self.coarse_dir.iterdir()):
            if p.suffix.lower() not in MASK_EXTS:
                continue
            stem = p.stem
            if stem in ids:
                if stem in self._coarse_maps:
                    self._clashes.setdefault(stem, []).append(f"{self._coarse_maps[stem].name} and {p.name} in "
                                                              f"{self.coarse_dir}")
                    continue
                self._coarse_maps[stem] = p
                continue
            matched = False
            for pos in [i for i, ch in enumerate(stem) if ch == "_"]:
                sid, cls = stem[:pos], stem[pos + 1:]
                if sid in ids:
                    c = self.class_index(cls)
                    if c is not None:
                        known = self._coarse_probs.setdefault(sid, {})
                        if c in known:
                            self._clashes.setdefault(sid, []).append(
                                f"{known[c].name} and {p.name} (both class {c}) in {self.coarse_dir}")
                        else:
                            known[c] = p
                        matched = True
                        break
            if not matched and len(unknown) < 5:
                unknown.append(p.name)
        if not self._coarse_maps and not self._coarse_probs:
            raise G4SegError(f"no coarse masks for the listed ids in {self.coarse_dir}: expected "
                             f"<id>.png label maps or <id>_<class>.png probability maps"
                             + (f" (e.g. unmatched {', '.join(unknown)})" if unknown else ""))

    def __len__(self) -> int:
        return len(self.ids)

    def prompt_label(self, c: int) -> str:
        name = self.class_names[c]
        return PROMPT_NAMES.get(name, name.replace("_", " "))

    def describe(self) -> dict:
        return {"root": str(self.root.resolve()), "split": self.split, "num_images": len(self.ids),
                "coarse": str(self.coarse_dir.resolve()) if self.coarse_dir else None,
                "protocol": self.protocol, "seed": self.seed, "num_classes": self.num_classes,
                "ignore_index": self.ignore_index, "classes_from": self.classes_from,
                "class_names": self.class_names}

    # -- checking (cheap: file headers only, before any model loads)
    def check(self, sid: str) -> None:
        """Raise G4SegError if the files of ``sid`` cannot be opened or the sizes disagree."""
        from ..files.image_files import file_size_hw

        if sid in self._clashes:
            raise G4SegError(f"{sid}: several files for one role ({'; '.join(self._clashes[sid])}): "
                             "remove or rename all but one")
        hw = file_size_hw(self._images[sid])
        gt_hw = file_size_hw(self._gts[sid])
        if gt_hw != hw:
            raise G4SegError(f"{sid}: image {self._images[sid]} is {hw[1]}x{hw[0]} but label map "
                             f"{self._gts[sid]} is {gt_hw[1]}x{gt_hw[0]} (width x height)")
        coarse = [self._coarse_maps[sid]] if sid in self._coarse_maps else \
            list(self._coarse_probs.get(sid, {}).values())
        if self.protocol is None and not coarse:
            raise G4SegError(f"no coarse mask for {sid} in {self.coarse_dir}")
        for path in coarse:
            file_size_hw(path)  # coarse maps may be smaller (CAMs): they are resized, only opened here
        if sid in self._coarse_maps:
            self.coarse_label_lookup(self._coarse_maps[sid])

    def coarse_label_lookup(self, path: Path) -> Optional[np.ndarray]:
        """For a label map that names its labels (g4seg segment writes the names into the PNG): a table label ->
        dataset class index, found by name, so `segment --classes cat` scores its label 1 as cat. None for a map
        without names (its values are the dataset's indices)."""
        from ..files.mask_files import label_map_names

        names = label_map_names(path)
        if names is None:
            return None
        lookup = np.full(256, -1, np.int64)
        lookup[0] = 0
        unknown = []
        for k, name in enumerate(names[1:256], start=1):
            c = self.class_index(name)
            if c is None:
                unknown.append(f"{k} = {name!r}")
            else:
                lookup[k] = c
        if unknown:
            raise G4SegError(f"coarse label map {path} labels {', '.join(unknown[:5])}, which the dataset's classes do "
                             f"not include ({', '.join(self.class_names[1:6])}, ...): segment with the dataset's "
                             "class names (--classes voc for VOC) or give --class-names that include them")
        return lookup

    # -- loading
    def load(self, sid: str) -> LoadedSample:
        image = load_rgb(self._images[sid])
        gt = load_labels(self._gts[sid]).astype(np.int64)
        if gt.ndim != 2:
            raise G4SegError(f"label map {self._gts[sid]} is not 2-D")
        if gt.shape != image.shape[:2]:
            raise G4SegError(f"{sid}: image {image.shape[:2]} and label map {gt.shape} differ in size")
        hw = gt.shape
        valid_gt = gt[gt != self.ignore_index]
        if valid_gt.size and (valid_gt.min() < 0 or valid_gt.max() >= self.num_classes):
            raise G4SegError(f"{self._gts[sid]} holds label {int(valid_gt.max())} >= --num-classes "
                             f"{self.num_classes}")
        gt_classes = sorted(int(c) for c in np.unique(valid_gt) if c != 0)
        coarse: Dict[int, np.ndarray] = {}
        if self.protocol is not None:
            for c in gt_classes:
                coarse[c] = make_coarse(gt == c, self.protocol, derive_seed(self.seed, sid, c),
                                        valid=gt != self.ignore_index)
        elif sid in self._coarse_maps:
            path = self._coarse_maps[sid]
            lab = resize_labels(load_labels(path).astype(np.int64), hw)
            lookup = self.coarse_label_lookup(path)
            if lookup is not None:  # the map names its labels: its indices -> the dataset's, by name
                unnamed = sorted(int(v) for v in np.unique(lab) if v != self.ignore_index and lookup[v] < 0)
                if unnamed:
                    raise G4SegError(f"coarse label map {path} holds label(s) {unnamed} beyond the names it records")
                lab = np.where(lab == self.ignore_index, lab, lookup[lab])
            for c in sorted(int(v) for v in np.unique(lab)):
                if 0 < c < self.num_classes:
                    coarse[c] = (lab == c).astype(np.float32)
        elif sid in self._coarse_probs:
            for c, path in sorted(self._coarse_probs[sid].items()):
                if c != 0:
                    coarse[c] = resize_probability(load_prob(path), hw)
        else:
            raise G4SegError(f"no coarse mask for {sid} in {self.coarse_dir}")
        if self.classes_from == "gt":
            coarse = {c: coarse.get(c, np.zeros(hw, np.float32)) for c in gt_classes}
        labels = {c: self.prompt_label(c) for c in coarse}
        return LoadedSample(sid, image, gt, coarse, str(self._images[sid]), str(self._gts[sid]), labels)
