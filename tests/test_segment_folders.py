"""`g4seg segment` folders as robust as refine's (issue 18.6): the one folder-run helper checks every image
(decoded) before the models load, goes on past bad ones, lists them, and counts what it did."""

import json

import numpy as np
import pytest
from PIL import Image

import g4seg_core.commands.segment as segment_command
from g4seg_core.commands.main import main

FAST = ("--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32")


def _image(path, h=48, w=40, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def model_loads(monkeypatch):
    calls = []
    real = segment_command.load_models

    def counting(args, config):
        calls.append(1)
        return real(args, config)

    monkeypatch.setattr(segment_command, "load_models", counting)
    return calls


def _folder(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs / "a.png")
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(imgs / "grey.png")      # greyscale, no --convert-rgb
    _image(imgs / "trunc.png", seed=2)
    data = (imgs / "trunc.png").read_bytes()
    (imgs / "trunc.png").write_bytes(data[: len(data) // 2])                 # header fine, pixels cut
    np.save(imgs / "arr.npy", (np.random.default_rng(3).random((48, 40, 3)) * 255).astype(np.uint8))
    return imgs


def test_bad_images_are_found_before_the_models_and_listed(tmp_path, capsys, model_loads):
    imgs = _folder(tmp_path)
    out = tmp_path / "out"
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "2 image(s) fail the checks" in err and err.index("fail the checks") < err.index("RANDOM WEIGHTS")
    assert "grey.png" in err and "--convert-rgb" in err and "trunc.png" in err and "Traceback" not in err
    assert "4 image(s): 2 done, 0 skipped, 2 failed" in err
    assert model_loads == [1]
    assert (out / "a.png").is_file() and (out / "arr.png").is_file()   # a .npy image in a folder, as alone
    run = json.loads((out / "g4seg_segment_run.json").read_text())
    assert run["done"] == ["a.png", "arr.npy"] and [f["image"] for f in run["failed"]] == ["grey.png", "trunc.png"]
    assert run["images"] == len(run["done"]) + len(run["skipped"]) + len(run["failed"])


def test_nothing_left_to_do_loads_no_model(tmp_path, capsys, model_loads):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(imgs / "grey.png")
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(tmp_path / "o"), *FAST]) == 1
    assert model_loads == []
    _image(imgs / "a.png")
    out = tmp_path / "o2"
    argv = ["segment", str(imgs), "--classes", "cat", "--out", str(out), "--convert-rgb", *FAST]
    assert main(argv) == 0 and model_loads == [1]
    capsys.readouterr()
    stamp = (out / "a_segment.json").stat().st_mtime_ns
    assert main(argv + ["--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert model_loads == [1] and "skipping 2 image(s)" in err and "2 image(s): 0 done, 2 skipped, 0 failed" in err
    assert (out / "a_segment.json").stat().st_mtime_ns == stamp
    # other classes, other parameters: done again, and the overwrite is said
    assert main(argv + ["--skip-existing", "--classes", "dog"]) == 0
    assert "overwriting the earlier outputs of 2 image(s)" in capsys.readouterr().err and model_loads == [1, 1]
    assert main(argv + ["--skip-existing", "--classes", "dog", "--templates", "imagenet80"]) == 0
    assert model_loads == [1, 1, 1]


def test_an_os_error_of_one_image_is_listed_and_the_rest_go_on(tmp_path, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for stem in ("a", "b", "c"):
        _image(imgs / f"{stem}.png")
    out = tmp_path / "out"
    (out / "b_overlay.jpg").mkdir(parents=True)  # an output path that is a folder: an OSError at write time
    assert main(["segment", str(imgs), "--classes", "cat", "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert "b.png: failed, going on" in err and "3 image(s): 2 done, 0 skipped, 1 failed" in err
    assert (out / "a_segment.json").is_file() and (out / "c_segment.json").is_file()
    assert not (out / "b_segment.json").exists()


@pytest.mark.parametrize("flags, named", [(["--beta", "0.9"], "--beta"), (["--family", "sd21"], "--family"),
                                          (["--size", "64", "--grid", "0"], "--size, --grid")])
def test_g4seg_flags_without_refine_are_refused(tmp_path, capsys, model_loads, flags, named):
    _image(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "cat", "--out", str(tmp_path / "o"), *FAST,
                 *flags]) == 2
    err = capsys.readouterr().err
    assert named in err and "--refine" in err and model_loads == []
    cfg = tmp_path / "c.json"
    cfg.write_text('{"beta": 0.9}')
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "cat", "--out", str(tmp_path / "o"), *FAST,
                 "--config", str(cfg)]) == 2
    assert "--config" in capsys.readouterr().err
    # --device and --dtype serve the segmenter too: accepted
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "cat", "--out", str(tmp_path / "o"), *FAST,
                 "--device", "cpu"]) == 0


def test_interrupt_names_the_command_to_rerun(tmp_path, capsys, monkeypatch):
    _image(tmp_path / "a.png")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment_command, "_segment_one", interrupted)
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "cat", "--out", str(tmp_path / "o"), *FAST]) == 130
    err = capsys.readouterr().err
    assert "`g4seg segment`" in err and "--skip-existing" in err and "refine" not in err


@pytest.mark.parametrize("command, example", [("segment", "STEM.png"), ("refine", "STEM_refined_mask.png")])
def test_duplicate_stem_message_names_the_commands_outputs(tmp_path, capsys, command, example):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _image(imgs / "x.png")
    _image(imgs / "x.jpg")
    (tmp_path / "masks").mkdir()  # refine refuses IMAGE and MASK naming one folder before it lists the files
    argv = ["segment", str(imgs), "--classes", "cat"] if command == "segment" else \
        ["refine", str(imgs), str(tmp_path / "masks"), "--label", "cat"]
    assert main(argv + ["--out", str(tmp_path / "o"), "--selfcheck"]) == 2
    err = capsys.readouterr().err
    assert example in err and "x.jpg and x.png" in err
