import math

import numpy as np
import pytest

from g4seg_core.evaluation import metrics as M
from g4seg_core.errors import G4SegError


def square(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- IoU

def test_iou_hand_computed():
    pred = np.array([[1, 1], [0, 0]], dtype=bool)
    gt = np.array([[1, 0], [1, 0]], dtype=bool)
    assert M.iou(pred, gt) == pytest.approx(1 / 3)
    assert M.iou(gt, gt) == 1.0
    assert M.iou(pred, ~pred) == 0.0                       # zero overlap
    z = np.zeros((3, 3), bool)
    assert M.iou(z, z) == 1.0                              # both empty: agree
    assert math.isnan(M.iou(z, z, empty=float("nan")))
    # probabilities are thresholded at 0.5; valid restricts the pixels counted
    assert M.iou(np.array([[0.7, 0.2]]), np.array([[1, 0]])) == 1.0
    assert M.iou(pred, gt, valid=np.array([[1, 1], [0, 1]], bool)) == pytest.approx(1 / 2)
    with pytest.raises(G4SegError):
        M.iou(np.zeros((2, 2)), np.zeros((3, 3)))


def test_confusion_matrix_hand_computed_with_ignore_and_absent_class():
    gt = np.array([[0, 1], [1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1], [0, 2]], dtype=np.uint8)   # the class-2 pixel is on an ignored pixel
    cm = M.ConfusionMatrix(3).update(pred, gt)
    assert cm.matrix.tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    per = cm.per_class_iou()
    assert per[0] == pytest.approx(0.5)                  # tp 1 / (1 + 1 + 0)
    assert per[1] == pytest.approx(0.5)                  # tp 1 / (1 + 1 + 0)
    assert math.isnan(per[2])                            # absent from pred and gt
    assert cm.miou() == pytest.approx(0.5)               # NaN class excluded from the mean
    assert cm.pixel_accuracy() == pytest.approx(2 / 3)


def test_confusion_matrix_perfect_zero_and_empty():
    gt = np.array([[0, 0, 1, 1]])
    perfect = M.ConfusionMatrix(2).update(gt, gt)
    assert perfect.miou() == 1.0
    zero = M.ConfusionMatrix(2).update(1 - gt, gt)
    assert zero.miou() == 0.0
    assert math.isnan(M.ConfusionMatrix(2).miou())
    all_ignored = M.ConfusionMatrix(2).update(np.zeros((2, 2)), np.full((2, 2), 255))
    assert all_ignored.matrix.sum() == 0


def test_confusion_matrix_merge_and_dict_roundtrip():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 5, (16, 16)) for _ in range(4)]
    preds = [rng.integers(0, 5, (16, 16)) for _ in range(4)]
    for g in gts:
        g[rng.random(g.shape) < 0.1] = 255
    whole = M.ConfusionMatrix(5)
    for p, g in zip(preds, gts):
        whole.update(p, g)
    a = M.ConfusionMatrix(5).update(preds[0], gts[0]).update(preds[1], gts[1])
    b = M.ConfusionMatrix(5).update(preds[2], gts[2]).update(preds[3], gts[3])
    assert a + b == whole
    assert sum([a, b]) == whole
    c = a.copy()
    c += b
    assert c == whole
    again = M.ConfusionMatrix.from_dict(whole.to_dict())
    assert again == whole and again.miou() == whole.miou()
    sparse = M.ConfusionMatrix(5).add_entries(whole.sparse())
    assert sparse == whole
    with pytest.raises(G4SegError):
        a + M.ConfusionMatrix(4)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(G4SegError, match="outside"):
        M.ConfusionMatrix(3).update(np.array([[0, 1]]), np.array([[0, 7]]))
    with pytest.raises(G4SegError, match="prediction"):
        M.ConfusionMatrix(3).update(np.array([[0, 5]]), np.array([[0, 1]]))


# ----------------------------------------------------------------------------- morphology

def _brute_erode_square(mask, r):
    h, w = mask.shape
    pad = np.zeros((h + 2 * r, w + 2 * r), bool)
    pad[r:r + h, r:r + w] = mask
    return np.array([[pad[y:y + 2 * r + 1, x:x + 2 * r + 1].all() for x in range(w)] for y in range(h)])


def _brute_dilate_disk(mask, r, style):
    h, w = mask.shape
    halves = M.disk_half_widths(r, style)
    pad = np.zeros((h + 2 * r, w + 2 * r), bool)
    pad[r:r + h, r:r + w] = mask
    out = np.zeros_like(mask)
    for i, dy in enumerate(range(-r, r + 1)):
        for dx in range(-halves[i], halves[i] + 1):
            out |= pad[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


@pytest.mark.parametrize("r", [1, 2, 4])
def test_morphology_matches_brute_force(r):
    rng = np.random.default_rng(r)
    mask = rng.random((23, 31)) > 0.25
    assert np.array_equal(M.erode_square(mask, r, outside=False), _brute_erode_square(mask, r))
    for style in ("euclidean", "opencv"):
        assert np.array_equal(M.dilate_disk(mask, r, style), _brute_dilate_disk(mask, r, style))
        grey = M.grey_dilate_disk(mask.astype(np.float32), r, style)
        assert np.array_equal(grey > 0.5, _brute_dilate_disk(mask, r, style))
        # outside=True: the image edge does not erode
        assert np.array_equal(M.erode_disk(mask, r, style), ~_brute_dilate_disk(~mask, r, style))
        # outside=False: everything outside the image is background
        padded = np.zeros((23 + 2 * r, 31 + 2 * r), bool)
        padded[r:-r, r:-r] = mask
        expected = ~_brute_dilate_disk(~padded, r, style)[r:-r, r:-r]
        assert np.array_equal(M.erode_disk(mask, r, style, outside=False), expected)


def test_disk_shapes():
    assert M.disk_half_widths(1, "opencv").tolist() == [0, 1, 0]          # a cross, as cv2
    assert M.disk_half_widths(2, "opencv").tolist() == [0, 2, 2, 2, 0]
    assert M.disk_half_widths(2, "euclidean").tolist() == [0, 1, 2, 1, 0]


# ----------------------------------------------------------------------------- Boundary IoU

def test_boundary_band_of_a_square():
    m = square(100, 100, 20, 40, 30, 50)                 # 20 x 20
    d = M.boundary_dilation(m.shape, 0.02)               # round(0.02 * 141.4) = 3
    assert d == 3
    band = M.boundary_band(m)
    expected = m & ~square(100, 100, 23, 37, 33, 47)
    assert np.array_equal(band, expected)
    assert band.sum() == 400 - 14 * 14
    # the image edge counts as background (as Cheng et al.'s one-pixel padding does)
    full = np.ones((10, 10), bool)
    assert np.array_equal(M.boundary_band(full, dilation=2), ~square(10, 10, 2, 8, 2, 8))


def test_boundary_iou_hand_computed():
    gt = square(100, 100, 20, 40, 30, 50)
    pred = square(100, 100, 20, 40, 32, 52)              # shifted right by 2 px
    bg = gt & ~square(100, 100, 23, 37, 33, 47)
    bp = pred & ~square(100, 100, 23, 37, 35, 49)
    expected = (bg & bp).sum() / (bg | bp).sum()
    assert M.boundary_iou(pred, gt) == pytest.approx(expected)
    assert M.boundary_iou(gt, gt) == 1.0
    assert M.boundary_iou(square(100, 100, 0, 10, 0, 10), square(100, 100, 50, 60, 50, 60)) == 0.0
    z = np.zeros((8, 8), bool)
    assert M.boundary_iou(z, z) == 1.0
    inter, union = M.boundary_counts(pred, gt)
    assert inter == (bg & bp).sum() and union == (bg | bp).sum()
    # boundary IoU is much harsher than IoU for a small shift of a large object
    big_gt = square(512, 512, 100, 400, 100, 400)
    big_pred = square(512, 512, 100, 400, 110, 410)
    assert M.iou(big_pred, big_gt) > 0.9 > 0.6 > M.boundary_iou(big_pred, big_gt)


# ----------------------------------------------------------------------------- mBA

def test_mba_radii_follow_cascadepsp():
    assert M.mba_radii((300, 300)) == [1, 1, 1, 1, 1]
    assert M.mba_radii((512, 512)) == [1, 1, 1, 2, 2]
    assert M.mba_radii((1500, 1500)) == [1, 2, 4, 6, 8]


def test_mba_hand_computed():
    gt = square(300, 300, 10, 30, 10, 30)                # radii all 1 at 300x300
    assert M.mba(gt, gt) == 1.0
    # band = gradient with a 3x3 cross: 76 inner ring pixels + 80 outer (no corners)
    empty = np.zeros_like(gt)
    assert M.mba(empty, gt) == pytest.approx(80 / 156)
    assert M.mba(~gt, gt) == 0.0
    assert math.isnan(M.mba(empty, empty))               # no boundary in gt
    assert math.isnan(M.mba(gt, np.ones_like(gt)))       # image edge is not a boundary


def test_metrics_at_512_are_ordered_and_bounded():
    yy, xx = np.mgrid[:512, :512]
    gt = (yy - 256) ** 2 + (xx - 256) ** 2 < 150 ** 2
    near = (yy - 254) ** 2 + (xx - 258) ** 2 < 148 ** 2
    far = (yy - 240) ** 2 + (xx - 275) ** 2 < 120 ** 2
    for fn in (M.iou, M.boundary_iou, M.mba):
        a, b = fn(near, gt), fn(far, gt)
        assert 0.0 <= b < a <= 1.0, fn.__name__
