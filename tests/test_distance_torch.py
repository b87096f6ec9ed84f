"""The torch distance transform (batches [B, H, W] on any device) equals the numpy one exactly."""

import numpy as np
import pytest
import torch

from g4seg_core.errors import G4SegError
from g4seg_core.method import distance_transform as dt
from g4seg_core.method.distance_transform import (
    euclidean_distance_transform,
    euclidean_distance_transform_torch,
    signed_distance,
    signed_distance_maps,
    signed_distance_torch,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_masks(rng, count=40, max_side=40):
    """Random masks of every kind the row and column passes must get right."""
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(1, max_side, size=2))
        out.append(rng.random((h, w)) < rng.uniform(0.01, 0.95))
    out.append(np.eye(9, 13, dtype=bool))  # non-square, diagonal
    single = np.zeros((11, 7), bool)
    single[0, 6] = True  # one pixel in a corner
    out.append(single)
    out.append(~single)  # everything but one pixel
    border = np.zeros((16, 20), bool)
    border[:, :3] = True  # touching three borders
    out.append(border)
    out.append(np.array([[False, True, False, False, True]]))  # 1 x N
    out.append(np.array([[True], [False], [False], [True], [False]]))  # N x 1
    out.append(np.array([[True]]))
    out.append(np.zeros((4, 6), bool))  # empty: inf to the inside
    out.append(np.ones((6, 4), bool))  # full: inf to the outside
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_signed_distance_torch_equals_numpy(device):
    for m in _random_masks(np.random.default_rng(0)):
        want = signed_distance(m)
        got = signed_distance_torch(torch.from_numpy(m)[None].to(device))
        assert got.dtype == torch.float32 and got.device.type == device
        assert np.array_equal(got[0].cpu().numpy(), want), m.shape


@pytest.mark.parametrize("device", DEVICES)
def test_edt_torch_equals_numpy_on_a_batch(device):
    rng = np.random.default_rng(1)
    for _ in range(10):
        h, w = (int(v) for v in rng.integers(1, 30, size=2))
        feats = rng.random((3, h, w)) < rng.uniform(0.005, 0.5)
        got = euclidean_distance_transform_torch(torch.from_numpy(feats).to(device)).cpu().numpy()
        assert np.array_equal(got, euclidean_distance_transform(feats))


def test_the_existing_hand_cases():
    m = np.zeros((1, 6), dtype=bool)
    m[0, 2:] = True
    got = signed_distance_torch(torch.from_numpy(m)[None])[0].numpy()
    np.testing.assert_array_equal(got, np.array([[-1.5, -0.5, 0.5, 1.5, 2.5, 3.5]], np.float32))
    f = np.zeros((5, 7), dtype=bool)
    f[2, 3] = True
    d = euclidean_distance_transform_torch(torch.from_numpy(f)[None])[0]
    assert d[2, 3] == 0 and float(d[0, 0]) == pytest.approx(np.hypot(2, 3))
    assert torch.isinf(euclidean_distance_transform_torch(torch.zeros(1, 3, 3, dtype=torch.bool))).all()


def test_a_batch_of_512_masks_in_small_row_blocks(monkeypatch):
    """The row pass in blocks (the memory bound) gives the same values as the numpy transform."""
    monkeypatch.setattr(dt, "_CHUNK_ELEMENTS", 7 * 3 * 512 * 512)  # blocks of 7 rows (512 = 73 * 7 + 1)
    yy, xx = np.mgrid[:512, :512]
    rng = np.random.default_rng(2)
    masks = np.stack([(yy - 250) ** 2 + (xx - 260) ** 2 < 170 ** 2,
                      (yy < 100) | (rng.random((512, 512)) < 0.001),
                      (xx + yy) % 97 == 0])
    got = signed_distance_torch(torch.from_numpy(masks))
    for i in range(3):
        assert np.array_equal(got[i].numpy(), signed_distance(masks[i]))


def test_signed_distance_maps_cpu_uses_numpy_and_agrees():
    rng = np.random.default_rng(3)
    masks = rng.random((4, 23, 31)) < 0.3
    got = signed_distance_maps(torch.from_numpy(masks))
    assert got.dtype == torch.float32 and got.shape == (4, 23, 31)
    assert torch.equal(got, signed_distance_torch(torch.from_numpy(masks)))
    with pytest.raises(G4SegError, match=r"\[B, H, W\]"):
        signed_distance_maps(torch.zeros(3, 3, dtype=torch.bool))


def test_blocks_of_masks_rows_and_columns(monkeypatch):
    """A block budget smaller than one row of one mask splits the query columns too: same values."""
    rng = np.random.default_rng(5)
    masks = rng.random((3, 19, 41)) < 0.1
    want = signed_distance_torch(torch.from_numpy(masks))
    for budget in (41 * 41 * 2, 41 * 7, 41, 1):
        monkeypatch.setattr(dt, "_CHUNK_ELEMENTS", budget)
        assert torch.equal(signed_distance_torch(torch.from_numpy(masks)), want)
        assert np.array_equal(euclidean_distance_transform_torch(torch.from_numpy(masks)).numpy(),
                              euclidean_distance_transform(masks))
