import os

import numpy as np
import pytest
import torch
from PIL import Image

from g4seg_core.errors import G4SegError
from g4seg_core.method.distance_transform import euclidean_distance_transform, signed_distance
from g4seg_core.method.label_maps import class_probability_from_label_map, fuse_multiclass
from g4seg_core.files.mask_files import (
    load_label_map,
    load_probability,
    save_binary_png,
    save_label_map_png,
    save_probability_png16,
)
from g4seg_core.method.masks import (
    check_same_framing,
    is_binary,
    resize_probability,
    validate_probability,
)
from g4seg_core.method.softening import soften_binary
from g4seg_core.files.palettes import voc_palette

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def _disk(h=64, w=64, cy=32, cx=32, r=16):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)


def _brute_edt(features):
    h, w = features.shape
    ys, xs = np.nonzero(features)
    if len(ys) == 0:
        return np.full((h, w), np.inf)
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy[..., None] - ys) ** 2 + (xx[..., None] - xs) ** 2
    return np.sqrt(d2.min(axis=-1))


# ----------------------------------------------------------------- loading

def test_load_binary_png_0_255(tmp_path):
    arr = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    p = load_probability(tmp_path / "m.png")
    assert p.dtype == np.float32 and p.shape == (2, 2)
    np.testing.assert_array_equal(p, [[0, 1], [1, 0]])


def test_load_binary_png_0_1(tmp_path):
    arr = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_probability(tmp_path / "m.png"), [[0, 1], [1, 1]])


def test_load_mode_1_png(tmp_path):
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "m.png")
    np.testing.assert_array_equal(load_probability(tmp_path / "m.png"), [[1, 0]])


def test_load_soft_8bit(tmp_path):
    arr = np.array([[0, 51, 128, 255]], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "m.png")
    np.testing.assert_allclose(load_probability(tmp_path / "m.png"), [[0, 0.2, 128 / 255, 1]], atol=1e-7)


def test_load_16bit(tmp_path):
    arr = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "m.png")
    p = load_probability(tmp_path / "m.png")
    np.testing.assert_allclose(p, arr / 65535.0, atol=1e-7)


def test_load_rgb_equal_channels_and_rgba(tmp_path):
    g = np.array([[0, 102], [204, 255]], dtype=np.uint8)
    Image.fromarray(np.stack([g, g, g], -1)).save(tmp_path / "rgb.png")
    np.testing.assert_allclose(load_probability(tmp_path / "rgb.png"), g / 255.0, atol=1e-7)
    Image.fromarray(np.stack([g, g, g, np.full_like(g, 255)], -1)).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_probability(tmp_path / "rgba.png"), g / 255.0, atol=1e-7)
    # alpha is no longer ignored: read over black, as Load Coarse Mask reads an RGBA mask_image (test_bad_inputs)
    Image.fromarray(np.stack([g, g, g, np.full_like(g, 7)], -1)).save(tmp_path / "rgba7.png")
    np.testing.assert_allclose(load_probability(tmp_path / "rgba7.png"), g / 255.0 * 7 / 255.0, atol=1e-7)


def test_load_colour_rgb_errors(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (128, 0, 0)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(G4SegError, match="colour") as e:
        load_probability(tmp_path / "c.png")
    assert "--mask-class" in str(e.value) and "class_index_or_name" in str(e.value)  # what a user can set


def test_load_palette_png_errors(tmp_path):
    save_label_map_png(np.array([[0, 8]], dtype=np.uint8), tmp_path / "p.png")
    with pytest.raises(G4SegError, match="palette") as e:
        load_probability(tmp_path / "p.png")
    assert "--mask-class" in str(e.value) and "class_index_or_name" in str(e.value)


def test_load_npy(tmp_path):
    arr = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float64)
    np.save(tmp_path / "m.npy", arr)
    p = load_probability(tmp_path / "m.npy")
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, arr)


def test_load_npy_nan_error(tmp_path):
    arr = np.full((3, 3), 0.5)
    arr[0, 0] = np.nan
    arr[1, 1] = np.nan
    np.save(tmp_path / "m.npy", arr)
    with pytest.raises(G4SegError, match="2 NaN values") as e:
        load_probability(tmp_path / "m.npy")
    assert "nan_to_num" in str(e.value) and "m.npy" in str(e.value)


def test_load_npy_range_and_shape_errors(tmp_path):
    np.save(tmp_path / "r.npy", np.array([[0.0, 200.0]]))
    with pytest.raises(G4SegError, match=r"outside \[0, 1\].*divide by 255"):
        load_probability(tmp_path / "r.npy")
    np.save(tmp_path / "l.npy", np.array([[-3.0, 2.0]]))
    with pytest.raises(G4SegError, match="sigmoid"):
        load_probability(tmp_path / "l.npy")
    np.save(tmp_path / "s.npy", np.zeros((2, 3, 3)))
    with pytest.raises(G4SegError, match=r"shape \(2, 3, 3\)"):
        load_probability(tmp_path / "s.npy")


def test_load_missing_and_unreadable(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(G4SegError, match="not found") as e:
        load_probability(missing)
    assert str(missing) in str(e.value)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(G4SegError, match="cannot read") as e:
        load_probability(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(G4SegError, match="not found"):
        load_probability(tmp_path / "nope.npy")
    with pytest.raises(G4SegError, match="not found"):
        load_label_map(missing)


# ----------------------------------------------------------------- saving / round trips

def test_png16_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.random((17, 23)).astype(np.float32)
    path = save_probability_png16(p, tmp_path / "sub" / "p.png")
    img = Image.open(path)
    assert img.mode.startswith("I")
    back = load_probability(path)
    assert np.abs(back - p).max() <= 0.5 / 65535 + 1e-7


def test_png16_exact_values(tmp_path):
    p = np.array([[0.0, 1.0, 0.5]], dtype=np.float32)
    save_probability_png16(p, tmp_path / "p.png")
    raw = np.asarray(Image.open(tmp_path / "p.png")).astype(np.int64)
    np.testing.assert_array_equal(raw, [[0, 65535, 32768]])


def test_binary_png(tmp_path):
    p = np.array([[0.1, 0.5, 0.9]], dtype=np.float32)
    save_binary_png(p, tmp_path / "b.png")
    raw = np.asarray(Image.open(tmp_path / "b.png"))
    assert raw.dtype == np.uint8
    np.testing.assert_array_equal(raw, [[0, 255, 255]])
    np.testing.assert_array_equal(load_probability(tmp_path / "b.png"), [[0, 1, 1]])
    save_binary_png(np.array([[True, False]]), tmp_path / "b2.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b2.png")), [[255, 0]])
    save_binary_png(p, tmp_path / "b3.png", threshold=0.95)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b3.png")), [[0, 0, 0]])


def test_label_map_round_trip(tmp_path):
    labels = np.array([[0, 8, 15], [255, 20, 0]], dtype=np.uint8)
    save_label_map_png(labels, tmp_path / "l.png")
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P"
    pal = np.array(img.getpalette()[:768]).reshape(256, 3)
    np.testing.assert_array_equal(pal, voc_palette())
    np.testing.assert_array_equal(load_label_map(tmp_path / "l.png"), labels)


def test_label_map_grayscale_rgb_npy(tmp_path):
    labels = np.array([[0, 8], [15, 255]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "g.png"), labels)
    # RGB image drawn with VOC colours decodes to indices.
    Image.fromarray(voc_palette()[labels]).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_label_map(tmp_path / "rgb.png"), labels)
    rgb = voc_palette()[labels].copy()
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(G4SegError, match=r"\(1, 2, 3\)"):
        load_label_map(tmp_path / "bad.png")
    np.save(tmp_path / "l.npy", labels.astype(np.int64))
    np.testing.assert_array_equal(load_label_map(tmp_path / "l.npy"), labels)
    np.save(tmp_path / "big.npy", np.array([[0, 300]]))
    with pytest.raises(G4SegError, match="0..254"):
        load_label_map(tmp_path / "big.npy")


# ----------------------------------------------------------------- validation

def test_validate_probability_ok_and_converts():
    out = validate_probability(np.array([[0, 1]], dtype=np.uint8))
    assert out.dtype == np.float32
    out = validate_probability(torch.tensor([[0.25, 0.75]], dtype=torch.float16))
    np.testing.assert_allclose(out, [[0.25, 0.75]])
    out = validate_probability(np.array([[True, False]]))
    np.testing.assert_array_equal(out, [[1, 0]])
    # round-off just outside [0, 1] is clipped
    out = validate_probability(np.array([[-1e-6, 1 + 1e-6]]))
    np.testing.assert_array_equal(out, [[0, 1]])


def test_validate_probability_errors():
    a = np.full((4, 4), 0.5, dtype=np.float32)
    a[0, :3] = np.nan
    with pytest.raises(G4SegError, match="3 NaN values") as e:
        validate_probability(a, name="coarse map")
    assert "coarse map" in str(e.value) and "nan_to_num" in str(e.value)
    b = np.full((2, 2), 0.5)
    b[0, 0] = np.inf
    with pytest.raises(G4SegError, match="1 infinite value"):
        validate_probability(b)
    with pytest.raises(G4SegError, match=r"\[0, 1.5\].*outside"):
        validate_probability(np.array([[0.0, 1.5]]))
    with pytest.raises(G4SegError, match="single channel"):
        validate_probability(np.zeros((1, 4, 4)))
    with pytest.raises(G4SegError, match=r"shape \(4,\)"):
        validate_probability(np.zeros(4))
    with pytest.raises(G4SegError, match="dtype"):
        validate_probability(np.array([["a"]]))


def test_check_same_framing():
    """Any mask resolution with the image's aspect ratio; another framing is an error naming both sizes."""
    check_same_framing((300, 451), (300, 451))
    check_same_framing((300, 451), (150, 225))  # half resolution, 0.3 % aspect difference
    with pytest.raises(G4SegError) as e:
        check_same_framing((300, 451), (512, 512))
    msg = str(e.value)
    assert "512x512" in msg and "451x300" in msg and "aspect ratios differ" in msg


def test_is_binary():
    assert is_binary(np.array([[0.0, 1.0]]))
    assert is_binary(np.array([[True, False]]))
    assert not is_binary(np.array([[0.0, 0.5]]))


# ----------------------------------------------------------------- distance transform

def test_edt_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = rng.integers(1, 24, size=2)
        feats = rng.random((h, w)) < rng.uniform(0.02, 0.6)
        got = euclidean_distance_transform(feats)
        want = _brute_edt(feats)
        assert got.shape == (h, w)
        assert np.array_equal(np.isinf(got), np.isinf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=1e-6, atol=1e-5)


def test_edt_single_point_and_empty():
    f = np.zeros((5, 7), dtype=bool)
    f[2, 3] = True
    d = euclidean_distance_transform(f)
    assert d[2, 3] == 0 and d[0, 0] == pytest.approx(np.hypot(2, 3))
    assert np.isinf(euclidean_distance_transform(np.zeros((3, 3), bool))).all()


def test_signed_distance_hand():
    m = np.zeros((1, 6), dtype=bool)
    m[0, 2:] = True
    np.testing.assert_allclose(signed_distance(m), [[-1.5, -0.5, 0.5, 1.5, 2.5, 3.5]])


# ----------------------------------------------------------------- softening

def test_soften_sdf_properties():
    width = 4.0
    m = np.zeros((80, 80), dtype=np.float32)
    m[:, 40:] = 1.0  # straight vertical edge between columns 39 and 40
    soft, desc = soften_binary(m, "sdf", width)
    assert "sdf" in desc and "softened" in desc
    row = soft[40]
    # boundary pixels straddle 0.5 symmetrically
    assert abs((row[39] + row[40]) / 2 - 0.5) < 1e-6
    assert 0.5 < row[40] < 0.7 and 0.3 < row[39] < 0.5
    # deep inside / outside at 2 x width
    assert row[40 + int(2 * width)] > 0.9 and row[39 - int(2 * width)] < 0.1
    assert row[79] > 0.99 and row[0] < 0.01
    # monotone in the distance across the edge (strictly where float32 has not saturated)
    assert np.all(np.diff(row) >= 0)
    assert np.all(np.diff(row[30:50]) > 0)


def test_soften_sdf_disk_monotone_in_distance():
    m = _disk(96, 96, 48, 48, 25)
    soft, _ = soften_binary(m, "sdf", 8.0)
    sd = signed_distance(m > 0.5)
    order = np.argsort(sd.ravel(), kind="stable")
    assert np.all(np.diff(soft.ravel()[order]) >= -1e-7)
    assert soft[48, 48] > 0.99  # depth 24.5 px
    assert np.all((soft >= 0.5) == (m > 0.5))


def test_soften_blur():
    m = np.zeros((64, 64), dtype=np.float32)
    m[:, 32:] = 1.0
    soft, desc = soften_binary(m, "blur", 8.0)
    assert "blur" in desc and "sigma 4" in desc
    row = soft[32]
    assert abs((row[31] + row[32]) / 2 - 0.5) < 1e-4
    assert row[63] > 0.999 and row[0] < 0.001
    assert np.all(np.diff(row) >= -1e-6)


def test_soften_none_and_soft_input():
    m = _disk()
    out, desc = soften_binary(m, "none")
    np.testing.assert_array_equal(out, m)
    assert "not softened" in desc
    soft = np.full((8, 8), 0.3, dtype=np.float32)
    soft[2:5, 2:5] = 0.8
    out, desc = soften_binary(soft, "sdf")
    np.testing.assert_array_equal(out, soft)
    assert desc == "soft input, not softened"


def test_soften_empty_and_full():
    with pytest.raises(G4SegError, match="empty") as e:
        soften_binary(np.zeros((8, 8)))
    assert "not found by the coarse segmenter" in str(e.value)
    with pytest.raises(G4SegError, match="whole image"):
        soften_binary(np.ones((8, 8)))
    with pytest.raises(G4SegError, match="empty"):
        soften_binary(np.zeros((8, 8)), "none")
    out, desc = soften_binary(np.zeros((8, 8)), allow_trivial=True)
    assert not out.any() and "empty" in desc
    out, desc = soften_binary(np.ones((8, 8)), "blur", allow_trivial=True)
    assert out.all() and "full" in desc


def test_soften_bad_args():
    with pytest.raises(G4SegError, match="soften="):
        soften_binary(_disk(), "gauss")
    with pytest.raises(G4SegError, match="width"):
        soften_binary(_disk(), "sdf", 0.0)


def test_soften_512_speckle_shape():
    m = _disk(512, 512, 250, 260, 170)
    rng = np.random.default_rng(0)
    m[rng.random(m.shape) < 0.01] = 1.0  # speckle: many small components
    soft, _ = soften_binary(m, "sdf", 8.0)
    assert soft.shape == (512, 512) and soft.dtype == np.float32


# ----------------------------------------------------------------- resizing

def test_resize_modes():
    p = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    up = resize_probability(p, (4, 4), "nearest")
    np.testing.assert_array_equal(up, np.kron(p, np.ones((2, 2))))
    down = resize_probability(np.kron(p, np.ones((2, 2))), (2, 2), "area")
    np.testing.assert_array_equal(down, p)
    bl = resize_probability(p, (4, 4), "bilinear")
    assert bl.dtype == np.float32 and bl.shape == (4, 4)
    assert 0.0 <= bl.min() and bl.max() <= 1.0
    assert bl[0, 0] == pytest.approx(0.0) and bl[0, 1] == pytest.approx(0.25)
    with pytest.raises(G4SegError, match="resize mode"):
        resize_probability(p, (4, 4), "cubic")
    with pytest.raises(G4SegError, match="height, width"):
        resize_probability(p, (0, 4))


# ----------------------------------------------------------------- multi-class

def test_fuse_multiclass_hand_example():
    s8 = np.array([[0.9, 0.2, 0.6, 0.1]], dtype=np.float32)   # cat
    s12 = np.array([[0.1, 0.3, 0.7, 0.1]], dtype=np.float32)  # dog
    # max = [0.9, 0.3, 0.7, 0.1] -> bg = [0.1, 0.7, 0.3, 0.9]
    labels = fuse_multiclass({8: s8, 12: s12})
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[8, 0, 12, 0]])
    # bg_power = 3: bg = [0.001, 0.343, 0.027, 0.729]; 0.343 > 0.3, so pixel 2 stays background
    labels3 = fuse_multiclass({8: s8, 12: s12}, bg_power=3.0)
    np.testing.assert_array_equal(labels3, [[8, 0, 12, 0]])
    labels5 = fuse_multiclass({8: s8, 12: s12}, bg_power=5.0)  # bg[1] = 0.168 < 0.3
    np.testing.assert_array_equal(labels5, [[8, 12, 12, 0]])


def test_fuse_multiclass_errors():
    with pytest.raises(G4SegError, match="no class maps"):
        fuse_multiclass({})
    with pytest.raises(G4SegError, match="0 is background"):
        fuse_multiclass({0: np.zeros((2, 2))})
    with pytest.raises(G4SegError, match="same size"):
        fuse_multiclass({1: np.zeros((2, 2)), 2: np.zeros((3, 3))})
    with pytest.raises(G4SegError, match="bg_power"):
        fuse_multiclass({1: np.zeros((2, 2))}, bg_power=0)


def test_class_probability_from_label_map():
    labels = np.array([[0, 8, 255], [8, 12, 8]], dtype=np.uint8)
    p = class_probability_from_label_map(labels, 8)
    assert p.dtype == np.float32
    np.testing.assert_array_equal(p, [[0, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(class_probability_from_label_map(labels, "cat"), p)
    np.testing.assert_array_equal(class_probability_from_label_map(labels, "dog"), [[0, 0, 0], [0, 1, 0]])
    with pytest.raises(G4SegError, match="ignore"):
        class_probability_from_label_map(labels, 255)


# ----------------------------------------------------------------- example assets

def test_example_assets():
    image = Image.open(os.path.join(EXAMPLES, "cat.png"))
    assert image.mode == "RGB"
    h, w = image.height, image.width
    coarse = load_probability(os.path.join(EXAMPLES, "cat_coarse.png"))
    assert coarse.shape == (h, w) and is_binary(coarse)
    assert 0.3 < coarse.mean() < 0.95
    soft = load_probability(os.path.join(EXAMPLES, "cat_coarse_soft.png"))
    assert soft.shape == (h, w) and not is_binary(soft)
    for name in ("cat.png", "cat_coarse.png", "cat_coarse_soft.png"):
        assert os.path.getsize(os.path.join(EXAMPLES, name)) < 500_000


def test_16bit_probability_of_an_absent_class_round_trips_as_absent(tmp_path):
    # round(p * 65535) of tiny probabilities is only 0 and 1: it must not be read as a 0/1 binary mask
    prob = np.array([[0.0, 1e-5], [2e-5, 0.0]], dtype=np.float32)
    save_probability_png16(prob, tmp_path / "absent.png")
    back = load_probability(tmp_path / "absent.png")
    assert back.max() < 1e-4
    np.testing.assert_allclose(back, prob, atol=1 / 65535)
