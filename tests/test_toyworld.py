"""The toy world (g4seg_core/evaluation/toyworld.py): seeded, VOC-style, read unchanged by `g4seg eval`."""

import hashlib

import numpy as np
import pytest

from g4seg_core.evaluation import toyworld as tw
from g4seg_core.evaluation.datasets import VOCStyleDataset


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = tw.write_voc_dataset(tmp_path / "a", num_train=2, num_val=3, seed=1, size=64)
    b = tw.write_voc_dataset(tmp_path / "b", num_train=2, num_val=3, seed=1, size=64)
    c = tw.write_voc_dataset(tmp_path / "c", num_train=2, num_val=3, seed=2, size=64)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_scenes_hold_several_objects_and_their_labels():
    scenes = [tw.scene(0, "val", i) for i in range(20)]
    assert all(s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8 for s in scenes)
    assert all(2 <= len(s.objects) <= 4 for s in scenes)
    assert sum(len(s.classes) >= 2 for s in scenes) >= 10  # several classes per image, usually
    assert set().union(*[s.classes for s in scenes]) == set(range(1, len(tw.CLASS_NAMES)))
    for s in scenes:  # a class's pixels are coloured like it: the label map is where the object is
        for c in s.classes:
            inside = s.image[s.labels == c].astype(float).mean(0) / 255
            assert np.argmax(inside) == np.argmax(tw._COLOURS[c]) or c == 4  # ring: yellow, R ~ G
    focus = tw.scene(0, "clip", 0, main=3)
    assert focus.main == 3 and focus.objects[-1] == 3 and (focus.labels == 3).mean() > 0.1


def test_eval_reads_the_world_and_its_mixed_coarse_masks(tmp_path):
    root = tw.write_voc_dataset(tmp_path / "w", num_train=1, num_val=6, seed=0, size=64)
    assert (root / "ImageSets/Segmentation/val.txt").read_text().split() == [f"val_{i:05d}" for i in range(6)]
    assert "\ta photo of a " in (root / "captions.txt").read_text()
    names = (root / "class_names.txt").read_text().split()
    coarse = tw.write_mixed_coarse(root, tmp_path / "coarse", "val")
    protocols = [line.split("\t")[1] for line in (coarse / "protocols.txt").read_text().splitlines()]
    assert protocols == list(tw.MIXED_PROTOCOLS)
    ds = VOCStyleDataset(root, split="val", coarse_dir=str(coarse), num_classes=len(names), class_names=names)
    for sid in ds.ids:
        sample = ds.load(sid)
        assert set(sample.coarse) == {int(c) for c in np.unique(sample.gt) if c != 0}
        assert all(sample.labels[c] == tw.CLASS_NAMES[c] for c in sample.coarse)
    with pytest.raises(KeyError):
        tw.scene(0, "test", 0)
