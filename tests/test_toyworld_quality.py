"""Quality guard (issue 19): G4Seg must keep improving coarse masks on the toy world's held-out images.

The models in tests/data/toyworld were trained on the toy world by `python tools/train_toyworld.py`
(seeded, bit-identical on a rerun; docs/EVALUATION.md, "The toy world"). These tests build the first
LIMIT held-out images, write coarse masks with the project's protocols, run the real `g4seg eval` with
G4Seg's defaults and pin the sign and a floor of what tools/toyworld_benchmark.py measured. A quality
guard, not a timing: a change that makes the refinement stop helping, or hurt good masks more, fails.

Two things are pinned, because part of the gain over the coarse masks is not the mixing: the softened
maps of overlapping masks already fuse better than binary ones (`--beta 1`, no mixing, gains +1.27 mIoU
on the 200 held-out images). So besides the gain over the coarse masks, G4Seg must beat that softened
baseline on over-segmented (dilated) masks, the case where its mixing measurably helps here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from g4seg_core.commands.main import main
from g4seg_core.evaluation import toyworld

MODELS = Path(__file__).resolve().parent / "data" / "toyworld"
LIMIT = 24  # held-out images: ~65 (image, class) pairs, about a minute per eval on a 2-core CPU

# Floors (mIoU points). Measured on these 24 images with the committed models (CPU, float32): mIoU +0.99,
# bucket 40-80 +2.44 (30 samples), 80-100 -2.01 (18); on all 200 held-out images +0.98 / +2.35 / -2.39
# (docs/EVALUATION.md). The 80-100 floor pins today's harm to good masks (a known miss of issue 19's
# target, explained there) so that it cannot grow unnoticed; the others keep the sign with a margin.
MIN_GAIN_MIOU = 0.5
MIN_GAIN_40_80 = 1.5
MIN_GAIN_80_100 = -3.0
# Dilated masks (dilate-5) of the same 24 images: G4Seg 69.35 vs softened only 68.19 mIoU (+1.16);
# on the 200 images' dilated third +1.46 IoU points per mask.
MIN_MIXING_OVER_SOFTENING_DILATED = 0.5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if not (MODELS / "sd" / "model_index.json").is_file():
        pytest.fail(f"{MODELS} has no trained toy-world models: they are part of the repository "
                    "(rebuild them with `python tools/train_toyworld.py`)")
    tmp = tmp_path_factory.mktemp("toyworld")
    return toyworld.write_voc_dataset(tmp / "world", num_train=0, num_val=LIMIT)


def g4seg_eval(world: Path, coarse: Path, out: Path, *flags: str) -> dict:
    code = main(["eval", str(world), "--split", "val", "--class-names", str(world / "class_names.txt"),
                 "--num-classes", str(len(toyworld.CLASS_NAMES)), "--coarse", str(coarse), "--methods", "g4seg",
                 "--checkpoint", str(MODELS / "sd"), "--clip", str(MODELS / "clip_vision.safetensors"),
                 "--size", "128", "--dtype", "float32", "--device", "cpu", "--limit", str(LIMIT), "--out", str(out),
                 "--no-progress", *flags])
    assert code == 0
    return json.loads((out / "summary.json").read_text())["methods"]["g4seg"]


@pytest.fixture(scope="module")
def mixed_eval(world):
    coarse = toyworld.write_mixed_coarse(world, world.parent / "coarse", "val", seed=0, limit=LIMIT)
    return g4seg_eval(world, coarse, world.parent / "eval")


def test_g4seg_improves_the_toy_worlds_coarse_masks(mixed_eval):
    gain = mixed_eval["gain"]["miou"]
    assert gain >= MIN_GAIN_MIOU, f"G4Seg's mIoU gain on the toy world fell to {gain:+.2f} (floor {MIN_GAIN_MIOU})"


def test_g4seg_gains_in_the_40_80_bucket_and_keeps_the_good_masks(mixed_eval):
    buckets = mixed_eval["buckets"]
    mid, good = buckets["40-80"]["gain"], buckets["80-100"]["gain"]
    assert mid is not None and good is not None, buckets
    assert mid >= MIN_GAIN_40_80, f"40-80 bucket gain {mid:+.2f} (floor {MIN_GAIN_40_80})"
    assert good >= MIN_GAIN_80_100, f"80-100 bucket gain {good:+.2f} (floor {MIN_GAIN_80_100})"


def test_the_mixing_beats_softening_alone_on_dilated_masks(world):
    coarse = toyworld.write_mixed_coarse(world, world.parent / "dilated", "val", seed=0, limit=LIMIT,
                                         protocols=("dilate-5",))
    g4seg = g4seg_eval(world, coarse, world.parent / "eval_dilated")["after"]["miou"]
    softened = g4seg_eval(world, coarse, world.parent / "eval_softened", "--beta", "1")["after"]["miou"]
    assert g4seg - softened >= MIN_MIXING_OVER_SOFTENING_DILATED, (
        f"on dilated masks G4Seg reaches {g4seg:.2f} mIoU and the softened masks alone {softened:.2f}: the "
        f"mixing's own gain fell to {g4seg - softened:+.2f} (floor {MIN_MIXING_OVER_SOFTENING_DILATED})")
