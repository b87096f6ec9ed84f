"""Masks checked and softened as a batch of tensors (softening.prepare_coarse_batch, used by refine_batch) give
what the one-mask numpy path (prepare_coarse) gives: the same maps within 1e-5, descriptions and errors."""

import numpy as np
import pytest
import torch

from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method.softening import prepare_coarse, prepare_coarse_batch, soften_binary, soften_maps

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _disk(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.float32)


def _masks(rng):
    soft = np.clip(_disk(48, 64, 20, 30, 12) * 0.6 + rng.random((48, 64)).astype(np.float32) * 0.3, 0, 1)
    noisy = (rng.random((48, 64)) < 0.4).astype(np.float32)
    return [
        _disk(48, 64, 20, 30, 12),
        _disk(96, 128, 0, 127, 50),  # touching two borders, another size
        soft,
        noisy,
        (rng.random((24, 32)) < 0.02),  # bool, a few single pixels
        torch.from_numpy(_disk(48, 64, 40, 5, 9)).half(),  # a tensor, float16
        (_disk(96, 128, 50, 60, 30) * 255).astype(np.uint8) // 255,  # integers 0/1
        np.clip(_disk(48, 64, 24, 32, 10) + 5e-5, 0, None),  # round-off above 1: clipped, still binary
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soften", ["sdf", "blur", "none"])
def test_batch_equals_the_one_mask_path(device, soften):
    masks = _masks(np.random.default_rng(0))
    groups, descriptions = prepare_coarse_batch(masks, device, 64, soften, 8.0)
    got = {}
    for rows, maps in groups:
        assert maps.device.type == device and maps.dtype == torch.float32
        for j, row in enumerate(rows):
            got[row] = maps[j].cpu().numpy()
    assert sorted(got) == list(range(len(masks)))
    assert [tuple(rows) for rows, _ in groups] == [(0, 2, 3, 5, 7), (1, 6), (4,)]  # by size, first appearance
    for row, mask in enumerate(masks):
        want, desc = prepare_coarse(mask, 64, soften, 8.0)
        assert descriptions[row] == desc
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_soften_maps_random_masks_against_numpy(device):
    rng = np.random.default_rng(4)
    for h, w in [(1, 9), (9, 1), (17, 33), (64, 64)]:
        masks = rng.random((3, h, w)) < rng.uniform(0.05, 0.6)
        masks[:, 0, 0], masks[:, -1, -1] = True, False  # neither empty nor full
        for mode in ("sdf", "blur"):
            got = soften_maps(torch.from_numpy(masks.astype(np.float32)).to(device), mode, 6.0).cpu().numpy()
            for i in range(3):
                want, _ = soften_binary(masks[i].astype(np.float32), mode, 6.0)
                np.testing.assert_allclose(got[i], want, rtol=0, atol=1e-5)


def _error(call):
    with pytest.raises(G4SegError) as exc:
        call()
    return str(exc.value)


@pytest.mark.parametrize("bad", [
    np.full((8, 8), np.nan, np.float32),
    np.where(np.eye(8) > 0, np.inf, 0.5).astype(np.float32),
    np.full((8, 8), 200.0, np.float32),
    np.full((8, 8), -0.3, np.float32),
    np.zeros((8, 8), np.float32),
    np.ones((8, 8), np.float32),
    np.full((8, 8), 1e-7, np.float32),  # binary, rounds to empty
    np.zeros((1, 8, 8), np.float32),
    np.zeros((8, 8), np.complex64),
    np.zeros((0, 8), np.float32),
    "not a mask",
])
def test_errors_are_the_one_mask_errors_first_bad_mask_first(bad):
    good = _disk(8, 8, 4, 4, 2)
    other_bad = np.full((8, 8), np.nan, np.float32)  # a later bad mask does not mask the first one's error
    want = _error(lambda: prepare_coarse(bad, 64, "sdf", 8.0))
    assert _error(lambda: prepare_coarse_batch([good, bad, other_bad], "cpu", 64, "sdf", 8.0)) == want


def test_shape_check_runs_in_order_after_the_value_checks():
    seen = []

    def check(row, hw):
        seen.append((row, hw))
        if row == 1:
            raise G4SegError("framing of mask 1")

    masks = [_disk(8, 8, 4, 4, 2), _disk(8, 16, 4, 4, 2), np.full((8, 8), np.nan, np.float32)]
    assert _error(lambda: prepare_coarse_batch(masks, "cpu", 64, "sdf", 8.0, check)) == "framing of mask 1"
    assert seen == [(0, (8, 8)), (1, (8, 16))]


def test_inputs_are_not_changed():
    mask = np.clip(_disk(16, 16, 8, 8, 4) + 5e-5, 0, None)
    before = mask.copy()
    prepare_coarse_batch([mask], "cpu", 64, "sdf", 8.0)
    assert np.array_equal(mask, before)


def test_refine_batch_equals_refining_the_numpy_softened_masks():
    """The flow's batched softening gives the refined maps that the numpy-softened maps (soft inputs are not
    softened again) give, within 1e-5."""
    from g4seg_core.pipeline import G4SegPipeline

    pipe = G4SegPipeline.tiny()
    rng = np.random.default_rng(1)
    image = (rng.random((72, 56, 3)) * 255).astype(np.uint8)
    masks = [_disk(72, 56, 30, 20, 15), _disk(144, 112, 0, 111, 60), (rng.random((36, 28)) > 0.6).astype(np.float32)]
    for soften in ("sdf", "blur"):
        config = G4SegConfig(size=64, correspondence_grid=0, soften=soften)
        got = pipe.refine_batch([image] * 3, masks, "cat", config)
        soft = [prepare_coarse(m, 64, soften, 8.0)[0] for m in masks]
        want = pipe.refine_batch([image] * 3, soft, "cat", config)
        for g, w, s in zip(got, want, soft):
            np.testing.assert_allclose(g.coarse, s, rtol=0, atol=1e-5)
            np.testing.assert_allclose(g.prob, w.prob, rtol=0, atol=1e-5)
            assert g.prob.dtype == np.float32 and g.coarse.dtype == np.float32 and g.binary.dtype == np.bool_
            assert soften in g.softening


def test_device_bench_script_runs_on_a_cpu(tmp_path):
    """bench/softening_device.py (the GPU check of issue 16) on a CPU at a small size: its checks pass."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "softening_device.py"
    out = subprocess.run([sys.executable, str(script), "--device", "cpu", "--size", "48", "--batch", "2",
                          "--repeats", "1", "--json", str(tmp_path / "n.json")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    numbers = json.loads((tmp_path / "n.json").read_text())
    assert numbers["sdf_max_abs_diff"] <= 1e-5 and numbers["blur_max_abs_diff"] <= 1e-5
    assert "sdf_batch2" in numbers and "speed-up" in out.stdout


def test_strided_read_only_and_big_endian_maps():
    base = _disk(32, 48, 16, 20, 9)
    flipped = np.flipud(base)  # negative strides
    read_only = base.copy()
    read_only.setflags(write=False)
    big_endian = base.astype(">f4")
    channel = np.stack([base, base], axis=-1)[..., 0]  # a strided view
    masks = [flipped, read_only, big_endian, channel]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups, _ = prepare_coarse_batch(masks, "cpu", 64, "sdf", 8.0)
    (rows, maps), = groups
    for j, mask in enumerate(masks):
        np.testing.assert_allclose(maps[j].numpy(), prepare_coarse(mask, 64, "sdf", 8.0)[0], atol=1e-5)
