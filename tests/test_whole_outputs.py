"""The outputs of one image are whole or absent (issue 18): an OS error half-way through writing them (an output
path that is a folder, a full disk) leaves none of that image's new files, and the folder run goes on."""

import errno
import json

import numpy as np
import pytest
from PIL import Image

import g4seg_core.files.output_files as output_files
from g4seg_core.commands.main import main

SEG = ("--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32")
REFINE = ("--selfcheck", "--size", "64", "--grid", "0")


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(path)


def _mask(path):
    m = np.zeros((48, 40), np.uint8)
    m[10:35, 8:30] = 255
    Image.fromarray(m).save(path)


@pytest.fixture
def folders(tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for i, stem in enumerate(("a", "b")):
        _image(imgs / f"{stem}.png", seed=i)
        _mask(masks / f"{stem}.png")
    return imgs, masks


def _visible(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _command(command, imgs, masks, out):
    if command == "refine":
        return ["refine", str(imgs), str(masks), "--label", "cat", "--out", str(out), *REFINE]
    return ["segment", str(imgs), "--classes", "cat", "--out", str(out), *SEG]


# an output that the run cannot write: the overlay of a.png is a folder someone left there
BLOCKED = {"refine": "a_overlay.png", "segment": "a_overlay.jpg"}


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_an_output_path_that_is_a_folder_leaves_no_file_of_that_image(command, folders, tmp_path, capsys):
    imgs, masks = folders
    out = tmp_path / "out"
    (out / BLOCKED[command]).mkdir(parents=True)
    assert main(_command(command, imgs, masks, out)) == 1
    err = capsys.readouterr().err
    assert "a.png" in err and BLOCKED[command] in err and "Traceback" not in err
    files = _visible(out)
    assert not [f for f in files if f.startswith("a")], files          # none of a's files, whole set absent
    assert not [f for f in files if f.startswith(".")], files          # no temporary left behind
    assert any(f.startswith("b") for f in files)                      # the other image was done


def _failing_replace(monkeypatch, when):
    """os.replace failing (a full disk) on the third of image a's files, while written (into the staged
    temporary) or while renamed into place."""
    real_replace, seen = output_files.os.replace, []

    def replace(src, dst):
        name = str(dst).rsplit("/", 1)[-1]
        staged = name.startswith(".a") and ".part" in name
        if (staged if when == "written" else name.startswith("a")):
            seen.append(name)
            if len(seen) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(output_files.os, "replace", replace)


def _rerun_with_another_result(command, imgs, masks, out):
    argv = _command(command, imgs, masks, out)
    if command == "refine":                                           # another result, the same file names
        return argv + ["--seed", "1"]
    argv[argv.index("cat")] = "cat|kitten"
    return argv


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_a_full_disk_while_writing_keeps_the_earlier_whole_set(command, folders, tmp_path, capsys, monkeypatch):
    imgs, masks = folders
    out = tmp_path / "out"
    assert main(_command(command, imgs, masks, out)) == 0
    before = {f: (out / f).read_bytes() for f in _visible(out) if f.startswith("a")}
    _failing_replace(monkeypatch, "written")
    assert main(_rerun_with_another_result(command, imgs, masks, out)) == 1
    assert "No space left on device" in capsys.readouterr().err
    after = {f: (out / f).read_bytes() for f in _visible(out) if f.startswith("a")}
    assert after == before                                            # the earlier set, whole, untouched
    assert not [f for f in _visible(out) if f.startswith(".")]


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_a_failure_while_renaming_leaves_the_image_absent(command, folders, tmp_path, capsys, monkeypatch):
    imgs, masks = folders
    out = tmp_path / "out"
    assert main(_command(command, imgs, masks, out)) == 0
    _failing_replace(monkeypatch, "renamed")
    assert main(_rerun_with_another_result(command, imgs, masks, out)) == 1
    assert "No space left on device" in capsys.readouterr().err
    files = _visible(out)
    assert not [f for f in files if f.startswith(("a", "."))], files  # no mix of old and new files of a
    assert any(f.startswith("b") for f in files)
