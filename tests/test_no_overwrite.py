"""Nothing the user gave is ever written over (issue 18.1): every command refuses an --out that is an
input folder or holds an input it would overwrite, and the outputs of one run never share a name."""

import json

import numpy as np
from PIL import Image

from g4seg_core.commands.main import main

SEGMENT = ("--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32")
REFINE = ("--selfcheck", "--size", "64", "--grid", "0")


def _image(path, h=48, w=40, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path.read_bytes()


def _mask(path, h=48, w=40):
    m = np.zeros((h, w), np.uint8)
    m[10:35, 8:30] = 255
    Image.fromarray(m).save(path)


def test_segment_out_is_the_image_folder(tmp_path, capsys, monkeypatch):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    photo = _image(imgs / "cat.png")
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(imgs), *SEGMENT]) == 2
    assert "is the image folder" in capsys.readouterr().err
    monkeypatch.chdir(imgs)  # `--out .` from the images' folder, the images given as a relative path
    assert main(["segment", ".", "--classes", "cat", "--out", ".", *SEGMENT]) == 2
    assert main(["segment", "../imgs", "--classes", "cat", "--out", str(imgs), *SEGMENT]) == 2
    assert sorted(p.name for p in imgs.iterdir()) == ["cat.png"] and (imgs / "cat.png").read_bytes() == photo


def test_segment_single_image_would_overwrite_itself(tmp_path, capsys):
    photo = _image(tmp_path / "cat.png")
    assert main(["segment", str(tmp_path / "cat.png"), "--classes", "cat", "--out", str(tmp_path), *SEGMENT]) == 2
    err = capsys.readouterr().err
    assert "label map of cat.png would be written over the input" in err and "Traceback" not in err
    assert (tmp_path / "cat.png").read_bytes() == photo and not (tmp_path / "cat_segment.json").exists()
    # a .jpg beside its outputs replaces nothing: allowed
    _image(tmp_path / "dog.jpg")
    assert main(["segment", str(tmp_path / "dog.jpg"), "--classes", "cat", "--out", str(tmp_path), *SEGMENT]) == 0
    assert (tmp_path / "dog.png").is_file() and (tmp_path / "dog.jpg").is_file()


def test_segment_output_names_never_collide(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs / "x.png")
    _image(imgs / "x_cat.png", seed=1)
    out = tmp_path / "out"
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(out), *SEGMENT]) == 2
    err = capsys.readouterr().err
    assert "x_cat.png" in err and "class 'cat' probability of x.png" in err and "label map of x_cat.png" in err
    assert not out.exists() or not any(out.iterdir())
    # another class name: no clash, both written, and each report points at its own files
    assert main(["segment", str(imgs), "--classes", "dog", "--out", str(out), *SEGMENT]) == 0
    for stem in ("x", "x_cat"):
        report = json.loads((out / f"{stem}_segment.json").read_text())
        assert report["outputs"]["labels"] == str(out / f"{stem}.png")


def test_refine_refuses_to_write_over_an_input_in_out(tmp_path, capsys):
    _image(tmp_path / "img.png")
    _mask(tmp_path / "img_overlay.png")  # the mask has the name refine gives its overlay
    before = (tmp_path / "img_overlay.png").read_bytes()
    assert main(["refine", str(tmp_path / "img.png"), str(tmp_path / "img_overlay.png"), "--label", "cat",
                 "--out", str(tmp_path), *REFINE]) == 2
    assert "overlay of img.png would be written over the input" in capsys.readouterr().err
    assert (tmp_path / "img_overlay.png").read_bytes() == before
    # beside the inputs, when nothing is replaced, refine writes as before
    (tmp_path / "img_overlay.png").rename(tmp_path / "img_mask.png")
    assert main(["refine", str(tmp_path / "img.png"), str(tmp_path / "img_mask.png"), "--label", "cat",
                 "--out", str(tmp_path), *REFINE]) == 0


def test_refine_out_resolving_to_the_mask_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    _image(tmp_path / "i" / "a.png")
    _mask(tmp_path / "m" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "m")
    monkeypatch.chdir(tmp_path / "m")
    for out in (".", str(tmp_path / "link"), "../m/"):
        assert main(["refine", str(tmp_path / "i"), str(tmp_path / "m"), "--label", "cat", "--out", out,
                     *REFINE]) == 2
        assert "is the mask folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["a.png"]


def test_eval_out_may_not_be_an_input_folder(tmp_path, capsys):
    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "coarse"):
        (root / d).mkdir(parents=True)
    _image(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(root / "SegmentationClass" / "a.png")
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(root / "coarse" / "a.png")
    for out, what in ((root / "coarse", "coarse-mask folder"), (root, "dataset folder"),
                      (root / "SegmentationClass", "ground-truth folder")):
        assert main(["eval", str(root), "--coarse", str(root / "coarse"), "--methods", "none", "--out", str(out),
                     "--no-progress"]) == 2
        assert what in capsys.readouterr().err
    assert sorted(p.name for p in (root / "coarse").iterdir()) == ["a.png"]
    # a --config file that eval would replace with its own run.json
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text("{}")
    assert main(["eval", str(root), "--coarse", str(root / "coarse"), "--methods", "none", "--out",
                 str(tmp_path / "o"), "--config", str(tmp_path / "o" / "run.json"), "--no-progress"]) == 2
    assert "would be written over the input" in capsys.readouterr().err
