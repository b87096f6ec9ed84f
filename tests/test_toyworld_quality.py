"""Quality guard (issue 19): G4Seg must keep improving coarse masks on the toy world's held-out images.

The models in tests/data/toyworld were trained on the toy world by `python tools/train_toyworld.py`
(seeded; docs/EVALUATION.md, "The toy world"). This test builds the first LIMIT held-out images and
their mixed coarse masks (the same ones tools/toyworld_benchmark.py scores), runs the real `g4seg eval`
with G4Seg's defaults, and pins the sign and a floor of the gain measured there. It is a quality guard,
not a timing: a change that makes the refinement stop helping (or hurt the good masks) fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from g4seg_core.commands.main import main
from g4seg_core.evaluation import toyworld

MODELS = Path(__file__).resolve().parent / "data" / "toyworld"
LIMIT = 24  # held-out images: ~65 (image, class) pairs, seconds on a 2-core CPU

# Floors (mIoU points). Measured on these 24 images with the committed models (CPU, float32): mIoU +0.99,
# bucket 40-80 +2.44 (30 samples), 80-100 -2.01 (18); on all 200 held-out images +0.98 / +2.35 / -2.39
# (docs/EVALUATION.md). The 80-100 floor pins today's harm to good masks (a known miss of issue 19's
# target, explained there) so that it cannot grow unnoticed; the others keep the sign with a margin.
MIN_GAIN_MIOU = 0.5
MIN_GAIN_40_80 = 1.5
MIN_GAIN_80_100 = -3.0


@pytest.fixture(scope="module")
def toy_eval(tmp_path_factory):
    if not (MODELS / "sd" / "model_index.json").is_file():
        pytest.fail(f"{MODELS} has no trained toy-world models: they are part of the repository "
                    "(rebuild them with `python tools/train_toyworld.py`)")
    tmp = tmp_path_factory.mktemp("toyworld")
    world = toyworld.write_voc_dataset(tmp / "world", num_train=0, num_val=LIMIT)
    coarse = toyworld.write_mixed_coarse(world, tmp / "coarse", "val", seed=0, limit=LIMIT)
    out = tmp / "eval"
    code = main(["eval", str(world), "--split", "val", "--class-names", str(world / "class_names.txt"),
                 "--num-classes", str(len(toyworld.CLASS_NAMES)), "--coarse", str(coarse), "--methods", "g4seg",
                 "--checkpoint", str(MODELS / "sd"), "--clip", str(MODELS / "clip_vision.safetensors"),
                 "--size", "128", "--dtype", "float32", "--device", "cpu", "--limit", str(LIMIT), "--out", str(out),
                 "--no-progress"])
    assert code == 0
    return json.loads((out / "summary.json").read_text())["methods"]["g4seg"]


def test_g4seg_improves_the_toy_worlds_coarse_masks(toy_eval):
    gain = toy_eval["gain"]["miou"]
    assert gain >= MIN_GAIN_MIOU, f"G4Seg's mIoU gain on the toy world fell to {gain:+.2f} (floor {MIN_GAIN_MIOU})"


def test_g4seg_gains_in_the_40_80_bucket_and_keeps_the_good_masks(toy_eval):
    buckets = toy_eval["buckets"]
    mid, good = buckets["40-80"]["gain"], buckets["80-100"]["gain"]
    assert mid is not None and good is not None, buckets
    assert mid >= MIN_GAIN_40_80, f"40-80 bucket gain {mid:+.2f} (floor {MIN_GAIN_40_80})"
    assert good >= MIN_GAIN_80_100, f"80-100 bucket gain {good:+.2f} (floor {MIN_GAIN_80_100})"
