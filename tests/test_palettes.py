import numpy as np
import pytest

from g4seg_core.errors import G4SegError
from g4seg_core.files.palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    VOC_CLASSES,
    VOC_TO_ADE20K,
    ade20k_class_for,
    ade20k_color_for,
    draw_seg_palette,
    voc_class_index,
    voc_palette,
)


def test_voc_classes():
    assert len(VOC_CLASSES) == 21
    assert VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[20] == "tvmonitor"
    assert VOC_CLASSES[8] == "cat" and VOC_CLASSES[15] == "person"


def test_voc_palette_known_entries():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    expected = {
        0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
        7: (128, 128, 128), 8: (64, 0, 0), 12: (64, 0, 128), 15: (192, 128, 128),
        20: (0, 64, 128), 255: (224, 224, 192),
    }
    for idx, rgb in expected.items():
        assert tuple(pal[idx]) == rgb, idx
    assert len({tuple(c) for c in pal}) == 256  # all distinct


@pytest.mark.parametrize("name,idx", [
    ("cat", 8), ("Cat", 8), (" dog ", 12), ("airplane", 1), ("aeroplane", 1), ("tv", 20),
    ("tvmonitor", 20), ("tv_monitor", 20), ("motorbike", 14), ("motorcycle", 14),
    ("person", 15), ("people", 15), ("dining table", 11), ("diningtable", 11),
    ("potted-plant", 16), ("background", 0), ("couch", 18), (8, 8), ("8", 8), (np.int64(3), 3),
])
def test_voc_class_index(name, idx):
    assert voc_class_index(name) == idx


def test_voc_class_index_errors():
    with pytest.raises(G4SegError) as e:
        voc_class_index("giraffe")
    msg = str(e.value)
    assert "giraffe" in msg and "aeroplane" in msg and "tvmonitor" in msg
    with pytest.raises(G4SegError, match="0..20"):
        voc_class_index(21)
    with pytest.raises(G4SegError):
        voc_class_index(True)


def test_ade20k_tables():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert len(ADE20K_PALETTE) == 150
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_PALETTE[0] == (120, 120, 120)
    assert ADE20K_CLASSES[12] == "person" and ADE20K_PALETTE[12] == (150, 5, 61)
    assert ADE20K_CLASSES[20] == "car" and ADE20K_PALETTE[20] == (0, 102, 200)
    assert ADE20K_CLASSES[126] == "animal" and ADE20K_PALETTE[126] == (255, 0, 122)
    assert ADE20K_CLASSES[149] == "flag" and ADE20K_PALETTE[149] == (92, 0, 255)


def test_voc_to_ade20k_covers_all_voc_classes():
    assert set(VOC_TO_ADE20K) == set(VOC_CLASSES[1:])
    for voc, ade in VOC_TO_ADE20K.items():
        assert ade in ADE20K_CLASSES
        assert ade20k_class_for(voc) == ade


@pytest.mark.parametrize("name,ade", [
    ("cat", "animal"), ("dog", "animal"), ("kitten", "animal"), ("cats", "animal"),
    ("person", "person"), ("airplane", "airplane"), ("aeroplane", "airplane"),
    ("motorbike", "minibike"), ("motorcycle", "minibike"), ("tv", "television receiver"),
    ("tvmonitor", "television receiver"), ("dining table", "table"), ("pottedplant", "plant"),
    ("train", "bus"), ("Chest_of_Drawers", "chest of drawers"), ("sky", "sky"),
])
def test_ade20k_class_for(name, ade):
    assert ade20k_class_for(name) == ade


def test_ade20k_color_for():
    assert ade20k_color_for("cat") == (255, 0, 122)
    assert ade20k_color_for("person") == (150, 5, 61)
    assert ade20k_color_for("wall") == (120, 120, 120)
    with pytest.raises(G4SegError, match="color="):
        ade20k_color_for("quasar")


def test_draw_seg_palette():
    prob = np.array([[0.1, 0.5], [0.9, 0.49]], dtype=np.float32)
    img = draw_seg_palette(prob, "cat")
    assert img.shape == (2, 2, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[0, 0], (0, 0, 0))
    np.testing.assert_array_equal(img[0, 1], (255, 0, 122))
    np.testing.assert_array_equal(img[1, 0], (255, 0, 122))
    np.testing.assert_array_equal(img[1, 1], (0, 0, 0))
    wall = draw_seg_palette(prob, "cat", background="ade20k-wall")
    np.testing.assert_array_equal(wall[0, 0], (120, 120, 120))
    hi = draw_seg_palette(prob, "cat", threshold=0.8)
    assert (hi.reshape(-1, 3) != 0).any(axis=1).sum() == 1
    custom = draw_seg_palette(prob > 0.5, None, color=(1, 2, 3), background=(9, 9, 9))
    np.testing.assert_array_equal(custom[1, 0], (1, 2, 3))
    np.testing.assert_array_equal(custom[0, 1], (9, 9, 9))  # bool mask: 0.5 > 0.5 is False


def test_draw_seg_palette_errors():
    with pytest.raises(G4SegError, match="background"):
        draw_seg_palette(np.zeros((2, 2)), "cat", background="purple")
    with pytest.raises(G4SegError, match=r"\[H, W\]"):
        draw_seg_palette(np.zeros((1, 2, 2)), "cat")
    with pytest.raises(G4SegError, match="threshold"):
        draw_seg_palette(np.zeros((2, 2)), "cat", threshold=1.5)
    with pytest.raises(G4SegError, match="color"):
        draw_seg_palette(np.zeros((2, 2)), None)


def test_parse_class_choice_takes_any_index_and_names_and_rejects_nonsense():
    from g4seg_core.files.palettes import parse_class_choice

    assert parse_class_choice("37") == 37 and parse_class_choice(" 254 ") == 254 and parse_class_choice(0) == 0
    assert parse_class_choice("cat") == 8 and parse_class_choice("potted_plant") == 16
    assert parse_class_choice("Dining-Table") == 11
    for bad in ("-1", "c-a-t", "2.5", "1e3", "255", "256", "", "giraffe"):
        with pytest.raises(G4SegError):
            parse_class_choice(bad)
    with pytest.raises(G4SegError):
        voc_class_index("c-a-t")
    with pytest.raises(G4SegError):
        voc_class_index("-1")
