"""G4SegLoadCoarseMask's file side (issue 12): only regular files inside ComfyUI's input/temp
folders, IS_CHANGED without reading the file, right hints, every deep pixel mode read right."""

import os
import sys
import types

import numpy as np
import pytest
from PIL import Image

from g4seg_core.errors import G4SegError
from g4seg_core.files.mask_files import save_label_map_png
from nodes import mask_nodes
from nodes.mask_nodes import G4SegLoadCoarseMask


@pytest.fixture
def comfy_folders(tmp_path, monkeypatch):
    """A stand-in for ComfyUI's folder_paths with input/, temp/ and output/ under tmp_path."""
    dirs = {k: tmp_path / k for k in ("input", "temp", "output")}
    for d in dirs.values():
        d.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.get_input_directory = lambda: str(dirs["input"])
    fp.get_temp_directory = lambda: str(dirs["temp"])
    fp.get_output_directory = lambda: str(dirs["output"])

    def annotated_filepath(name):
        for tag in ("output", "input", "temp"):
            if name.endswith(f"[{tag}]"):
                return name[: -len(tag) - 2].rstrip(), str(dirs[tag])
        return name, None

    fp.annotated_filepath = annotated_filepath
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return dirs


def _binary(path, h=40, w=50):
    m = np.zeros((h, w), np.uint8)
    m[10:30, 10:40] = 255
    Image.fromarray(m).save(path)


def test_files_inside_input_and_temp_load(comfy_folders):
    _binary(comfy_folders["input"] / "m.png")
    (comfy_folders["input"] / "sub").mkdir()
    _binary(comfy_folders["input"] / "sub" / "n.png")
    _binary(comfy_folders["temp"] / "t.png")
    for name in ("m.png", "sub/n.png", "t.png [temp]", "m.png [input]"):
        assert G4SegLoadCoarseMask.VALIDATE_INPUTS(name) is True, name
        mask, _ = G4SegLoadCoarseMask().load(name, "auto", "", "sdf", 8.0)
        assert mask.shape == (1, 40, 50)


def test_paths_leaving_the_input_folder_are_validation_errors(comfy_folders, tmp_path):
    secret = tmp_path / "secret.png"
    _binary(secret)
    _binary(comfy_folders["output"] / "o.png")
    os.symlink(secret, comfy_folders["input"] / "link.png")
    os.mkfifo(comfy_folders["input"] / "fifo.png")
    (comfy_folders["input"] / "folder.png").mkdir()
    cases = {str(secret): "absolute", "../secret.png": "'..'", "sub/../../secret.png": "'..'",
             "o.png [output]": "outside", "link.png": "outside", "fifo.png": "not a regular file",
             "folder.png": "folder", "missing.png": "not found"}
    for name, fragment in cases.items():
        verdict = G4SegLoadCoarseMask.VALIDATE_INPUTS(name)
        assert isinstance(verdict, str) and fragment in verdict, (name, verdict)
        with pytest.raises(G4SegError, match=fragment):  # and load refuses too (never blocks on the FIFO)
            G4SegLoadCoarseMask().load(name, "auto", "", "sdf", 8.0)


def test_is_changed_uses_size_and_mtime_without_reading(comfy_folders, monkeypatch):
    path = comfy_folders["input"] / "m.png"
    _binary(path)
    first = G4SegLoadCoarseMask.IS_CHANGED("m.png")
    assert first == G4SegLoadCoarseMask.IS_CHANGED("m.png")
    import builtins

    def no_open(*args, **kwargs):
        raise AssertionError("IS_CHANGED opened the file")

    monkeypatch.setattr(builtins, "open", no_open)
    G4SegLoadCoarseMask.IS_CHANGED("m.png")
    monkeypatch.undo()
    _binary(path, w=60)
    os.utime(path, ns=(1, 1))
    assert G4SegLoadCoarseMask.IS_CHANGED("m.png") != first
    os.mkfifo(comfy_folders["input"] / "fifo.png")
    assert G4SegLoadCoarseMask.IS_CHANGED("fifo.png") == "fifo.png"  # returns at once


def test_empty_class_error_names_existing_inputs_and_classes(tmp_path):
    labels = np.zeros((40, 50), np.uint8)
    labels[5:20, 5:20] = 12  # dog
    labels[25:35, 25:45] = 40
    save_label_map_png(labels, tmp_path / "l.png")
    with pytest.raises(G4SegError) as e:
        mask_nodes.load_coarse_mask(str(tmp_path / "l.png"), "auto", "cat", "sdf", 8.0)
    msg = str(e.value)
    assert "allow_trivial" not in msg and "12 (dog)" in msg and "40" in msg
    mask, text = mask_nodes.load_coarse_mask(str(tmp_path / "l.png"), "auto", "40", "none", 8.0)  # index > 20
    assert float(mask[0, 30, 30]) == 1.0 and "class 40" in text
    for bad in ("-1", "c-a-t"):
        with pytest.raises(G4SegError):
            mask_nodes.load_coarse_mask(str(tmp_path / "l.png"), "auto", bad, "none", 8.0)
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(G4SegError) as e:
        mask_nodes.load_coarse_mask(str(tmp_path / "empty.png"), "auto", "", "sdf", 8.0)
    assert "empty" in str(e.value) and "allow_trivial" not in str(e.value)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "npy-uint16", "npy-float"])
def test_deep_mask_files_are_scaled(tmp_path, mode):
    soft = np.linspace(0, 1, 40 * 50).reshape(40, 50)
    if mode == "I;16":
        path = tmp_path / "m.png"
        Image.fromarray(np.round(soft * 65535).astype(np.uint16)).save(path)
    elif mode == "I":
        path = tmp_path / "m.tif"
        Image.fromarray(np.round(soft * 65535).astype(np.int32)).save(path)
    elif mode == "F":
        path = tmp_path / "m.tif"
        Image.fromarray(soft.astype(np.float32)).save(path)
    elif mode == "npy-uint16":
        path = tmp_path / "m.npy"
        np.save(path, np.round(soft * 65535).astype(np.uint16))
    else:
        path = tmp_path / "m.npy"
        np.save(path, soft.astype(np.float32))
    if mode in ("I;16", "I", "F"):
        assert Image.open(path).mode == mode
    if mode == "npy-uint16":  # integer .npy holding more than 0/1 are class indices, not 16-bit values
        with pytest.raises(G4SegError):
            mask_nodes.load_coarse_mask(str(path), "probability", "", "sdf", 8.0)
        return
    mask, text = mask_nodes.load_coarse_mask(str(path), "auto", "", "sdf", 8.0)
    assert "probability" in text
    np.testing.assert_allclose(mask[0].numpy(), soft, atol=1e-4)


def test_uniform_mask_is_said(tmp_path):
    Image.fromarray(np.full((40, 50), 128, np.uint8)).save(tmp_path / "u.png")
    _, text = mask_nodes.load_coarse_mask(str(tmp_path / "u.png"), "auto", "", "sdf", 8.0)
    assert "warning" in text and "no boundary" in text
