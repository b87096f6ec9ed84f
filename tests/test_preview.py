"""The before/after picture of Refine Mask, Mix Foreground and DenseCRF (nodes/preview.py), no ComfyUI."""

import numpy as np
import pytest
import torch

from g4seg_core.files.visualize import COARSE_COLOR, REFINED_COLOR
from nodes import NODE_CLASS_MAPPINGS
from nodes.preview import before_after_batch, with_preview


def _masks():
    coarse = torch.zeros(2, 40, 60)
    coarse[:, 10:30, 10:30] = 1
    refined = torch.zeros(2, 40, 60)
    refined[:, 10:30, 25:50] = 1
    return coarse, refined


def test_picture_shows_coarse_left_in_red_and_refined_right_in_green():
    coarse, refined = _masks()
    images = torch.full((2, 80, 120, 3), 0.2)  # twice the masks' size, same aspect
    pictures = before_after_batch(images, coarse, refined, 0.5)
    assert pictures.shape == (2, 80 + 18, 2 * 120 + 8, 3) and pictures.dtype == torch.float32
    arr = (pictures[0].numpy() * 255).round()
    left, right = arr[18:, :120], arr[18:, 128:]
    # inside the coarse square (image coords x 20..60, y 20..60): tinted towards red on the left only
    assert left[40, 30, 0] > left[40, 30, 1] + 40 and abs(right[40, 30, 0] - right[40, 30, 1]) < 5
    # inside the refined box only (x 60..100): green on the right, untouched on the left
    assert right[40, 80, 1] > right[40, 80, 0] + 40 and abs(left[40, 80, 1] - left[40, 80, 0]) < 5
    assert tuple(left[20, 20]) == COARSE_COLOR and tuple(right[20, 50]) == REFINED_COLOR  # outlines


def test_large_images_are_shown_at_most_512_high_and_without_an_image_on_grey():
    coarse, refined = _masks()
    assert before_after_batch(torch.rand(1, 1024, 1536, 3), coarse[:1], refined[:1], 0.5).shape[1] == 512 + 18
    grey = before_after_batch(None, coarse, refined, 0.5)
    assert grey.shape == (2, 40 + 18, 2 * 60 + 8, 3)


def test_node_result_gets_the_picture_appended_and_no_ui_files_outside_comfyui():
    coarse, refined = _masks()
    out = with_preview((refined, (refined >= 0.5).float()), torch.rand(2, 40, 60, 3), coarse, refined, 0.5)
    assert out["ui"] == {"images": []}
    prob, binary, overlay = out["result"]
    assert prob is refined and overlay.shape == (2, 58, 128, 3)


@pytest.mark.parametrize("node_id,names", [("G4SegRefine", ("refined", "binary", "generated", "overlay")),
                                           ("G4SegMixForeground", ("refined", "binary", "overlay")),
                                           ("G4SegDenseCRF", ("probability", "binary_mask", "overlay"))])
def test_overlay_output_is_appended(node_id, names):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert cls.RETURN_NAMES == names and cls.RETURN_TYPES[-1] == "IMAGE"
    assert len(cls.OUTPUT_TOOLTIPS) == len(names)


def test_saved_for_the_page_inside_comfyui(tmp_path, monkeypatch):
    """With ComfyUI's folder_paths the picture goes to its temp folder, listed as PreviewImage lists it."""
    import sys
    import types

    fake = types.ModuleType("folder_paths")
    fake.get_temp_directory = lambda: str(tmp_path)

    def get_save_image_path(prefix, folder, w, h):
        return folder, prefix, 1, "", prefix

    fake.get_save_image_path = get_save_image_path
    monkeypatch.setitem(sys.modules, "folder_paths", fake)
    coarse, refined = _masks()
    out = with_preview((refined,), None, coarse, refined, 0.5)
    shown = out["ui"]["images"]
    assert len(shown) == 2 and all(e["type"] == "temp" and e["subfolder"] == "" for e in shown)
    from PIL import Image
    saved = np.asarray(Image.open(tmp_path / shown[1]["filename"]))
    assert saved.shape == (58, 128, 3)
    np.testing.assert_allclose(saved / 255.0, out["result"][1][1].numpy(), atol=1 / 255)
