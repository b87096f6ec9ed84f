"""`g4seg refine` on bad input (issue 12): folders go on past bad pairs, checks come before any
model loads, outputs are atomic, hints are right. Tiny random-weight models."""

import json

import numpy as np
import pytest
from PIL import Image

import g4seg_core.commands.refine as cli
import g4seg_core.commands.selfcheck as selfcheck_command
from g4seg_core.commands.main import main
from g4seg_core.files.mask_files import save_label_map_png

FAST = ["--selfcheck", "--size", "64", "--grid", "0"]


def _image(path, h=48, w=40, seed=1):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)


def _mask(path, h=48, w=40, value=255):
    m = np.zeros((h, w), np.uint8)
    m[10:35, 8:30] = value
    Image.fromarray(m).save(path)


def _folders(tmp_path, stems=("a", "b", "c")):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i, stem in enumerate(stems):
        _image(images / f"{stem}.png", seed=i)
        _mask(masks / f"{stem}.png")
    return images, masks


@pytest.fixture
def model_loads(monkeypatch):
    """Counts pipeline builds (the expensive step every cheap check must come before)."""
    calls = []
    real = cli.build_pipeline

    def counting(args, config):
        calls.append(1)
        return real(args, config)

    monkeypatch.setattr(cli, "build_pipeline", counting)
    return calls


def test_folder_goes_on_past_bad_pairs_and_a_rerun_does_only_those(tmp_path, capsys, model_loads):
    images, masks = _folders(tmp_path, ("a", "b", "c", "d", "e"))
    good_b = (images / "b.png").read_bytes()
    (images / "b.png").write_bytes(good_b[: len(good_b) // 2])       # truncated image
    Image.fromarray(np.zeros((48, 40), np.uint8)).save(masks / "c.png")  # empty mask
    _mask(masks / "d.png", h=30)                                      # size mismatch
    (masks / "e.png").unlink()                                        # no mask
    out = tmp_path / "out"
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(out)] + FAST) == 1
    err = capsys.readouterr().err
    assert "4 image(s) failed" in err and "Traceback" not in err
    for name, fragment in (("b.png", "cannot read"), ("c.png", "empty"), ("d.png", "40x30"), ("e.png", "no mask")):
        assert any(line.strip().startswith(f"{name}:") and fragment in line for line in err.splitlines()), name
    assert (out / "a_g4seg.json").is_file() and not list(out.glob("b_*"))
    run = json.loads((out / "g4seg_run.json").read_text())
    assert run["done"] == ["a.png"] and [f["image"] for f in run["failed"]] == ["b.png", "c.png", "d.png", "e.png"]
    assert len(model_loads) == 1
    # fix two; the rerun refines just those
    (images / "b.png").write_bytes(good_b)
    _mask(masks / "c.png")
    before = (out / "a_g4seg.json").stat().st_mtime_ns
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(out), "--skip-existing"]
                + FAST) == 1
    err = capsys.readouterr().err
    assert "skipping 1 image(s)" in err and "2 image(s) failed" in err
    assert (out / "a_g4seg.json").stat().st_mtime_ns == before
    run = json.loads((out / "g4seg_run.json").read_text())
    assert run["done"] == ["b.png", "c.png"] and run["skipped"] == ["a.png"]
    # other parameters: nothing is "finished", and overwriting is said
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(out), "--skip-existing",
                 "--beta", "0.9"] + FAST) == 1
    assert "overwriting the earlier outputs of 3 image(s)" in capsys.readouterr().err


def test_all_pairs_bad_loads_no_model(tmp_path, capsys, model_loads):
    images, masks = _folders(tmp_path, ("a", "b"))
    for stem in ("a", "b"):
        _mask(masks / f"{stem}.png", w=20)
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(tmp_path / "o")] + FAST) == 1
    assert "2 image(s) failed" in capsys.readouterr().err
    assert model_loads == []


def test_single_pair_checks_come_before_models(tmp_path, capsys, model_loads):
    _image(tmp_path / "i.png")
    _mask(tmp_path / "m.png", w=20)
    assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat",
                 "--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert "20x48" in err and "40x48" in err and "option" not in err   # no hint at a nonexistent option
    assert model_loads == []


@pytest.mark.parametrize("kind", ["file", "parent_file"])
def test_out_naming_a_file_is_one_line_before_models(tmp_path, capsys, model_loads, kind):
    _image(tmp_path / "i.png")
    _mask(tmp_path / "m.png")
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" if kind == "file" else tmp_path / "taken" / "sub"
    assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat",
                 "--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--out" in err
    assert model_loads == []


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def failing(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.png"))

    monkeypatch.setattr(selfcheck_command, "cmd_selfcheck", failing)
    assert main(["selfcheck"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"g4seg: error: {tmp_path / 'x.png'}: Permission denied"


@pytest.mark.parametrize("images, masks, fragment", [
    (("x.png", "x.jpg"), ("x.png",), "x.jpg and x.png"),
    (("x.png",), ("x.png", "x.npy"), "x.npy and x.png"),
])
def test_duplicate_stems_are_refused(tmp_path, capsys, model_loads, images, masks, fragment):
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    for name in images:
        _image(tmp_path / "i" / name)
    for name in masks:
        if name.endswith(".npy"):
            np.save(tmp_path / "m" / name, np.zeros((48, 40), np.float32))
        else:
            _mask(tmp_path / "m" / name)
    assert main(["refine", str(tmp_path / "i"), str(tmp_path / "m"), "--label", "cat",
                 "--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert fragment in err and "rename" in err
    assert model_loads == []


def test_outputs_are_atomic_on_interrupt(tmp_path, monkeypatch):
    _image(tmp_path / "i.png")
    _mask(tmp_path / "m.png")
    out = tmp_path / "o"
    argv = ["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat", "--out", str(out)] + FAST
    assert main(argv) == 0
    good = {p.name: p.read_bytes() for p in out.iterdir()}

    import g4seg_core.files.output_files as output_files

    real_replace = output_files.os.replace
    calls = []

    def interrupted_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # Ctrl-C while the overlay is being put in place
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(output_files.os, "replace", interrupted_replace)
    assert main(argv + ["--beta", "0.5"]) == 130
    monkeypatch.setattr(output_files.os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == sorted(good)   # no temp file left behind
    assert (out / "i_overlay.png").read_bytes() == good["i_overlay.png"]  # the old good file, whole
    assert json.loads((out / "i_g4seg.json").read_text())["parameters"]["beta"] != 0.5
    for name in good:
        if name.endswith(".png"):
            Image.open(out / name).load()  # every file readable


def test_16bit_greyscale_photo_is_refined_against_the_real_picture(tmp_path, monkeypatch, capsys):
    from g4seg_core.pipeline import G4SegPipeline

    grey16 = (np.linspace(0, 65535, 48 * 40).reshape(48, 40)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    _mask(tmp_path / "m.png")
    seen = []
    real = G4SegPipeline.refine

    def spy(self, image, *args, **kwargs):
        seen.append(np.asarray(image))
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(G4SegPipeline, "refine", spy)
    argv = ["refine", str(tmp_path / "g.png"), str(tmp_path / "m.png"), "--label", "cat", "--out", str(tmp_path / "o")]
    assert main(argv + FAST) == 2
    assert "--convert-rgb" in capsys.readouterr().err and not seen
    assert main(argv + FAST + ["--convert-rgb"]) == 0
    assert "16-bit" in capsys.readouterr().err
    expected = np.round(grey16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(seen[0], np.repeat(expected[..., None], 3, axis=-1))
    assert seen[0].min() == 0 and seen[0].max() == 255 and len(np.unique(seen[0])) > 200  # not a white picture


def _label_map(path, labels):
    save_label_map_png(labels.astype(np.uint8), path)


@pytest.mark.parametrize("value", ["-1", "c-a-t", "2.5", "255", "300", "giraffe"])
def test_mask_class_rejects_nonsense(tmp_path, capsys, value):
    _image(tmp_path / "i.png")
    _label_map(tmp_path / "l.png", np.zeros((48, 40)))
    with pytest.raises(SystemExit) as e:
        main(["refine", str(tmp_path / "i.png"), str(tmp_path / "l.png"), "--label", "cat", "--out",
              str(tmp_path / "o"), f"--mask-class={value}"] + FAST)
    assert e.value.code == 2
    assert "--mask-class" in capsys.readouterr().err


def test_mask_class_any_index_and_names(tmp_path, capsys):
    _image(tmp_path / "i.png")
    labels = np.zeros((48, 40))
    labels[10:30, 5:25] = 37          # beyond VOC's 20 classes: any 0..254 index
    labels[30:45, 20:38] = 16         # potted plant
    _label_map(tmp_path / "l.png", labels)
    base = ["refine", str(tmp_path / "i.png"), str(tmp_path / "l.png"), "--label", "thing", "--out",
            str(tmp_path / "o")] + FAST
    assert main(base + ["--mask-class", "37"]) == 0
    assert main(base + ["--mask-class", "potted_plant"]) == 0
    assert main(base + ["--mask-class", "cat"]) == 2
    err = capsys.readouterr().err
    assert "no pixel of class 8 (cat)" in err and "16 (pottedplant)" in err and "37" in err


def test_mask_class_on_a_probability_map_says_it_is_not_a_label_map(tmp_path, capsys):
    _image(tmp_path / "i.png")
    yy, xx = np.mgrid[:48, :40]
    Image.fromarray((255 * np.exp(-((yy - 24) ** 2 + (xx - 20) ** 2) / 200.0)).astype(np.uint8)).save(tmp_path / "p.png")
    _mask(tmp_path / "b.png")
    for mask in ("p.png", "b.png"):
        assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / mask), "--label", "cat", "--out",
                     str(tmp_path / "o"), "--mask-class", "cat"] + FAST) == 2
        err = capsys.readouterr().err
        assert "not a label map" in err and "--mask-class" in err, mask


def test_uniform_mask_is_said(tmp_path, capsys):
    _image(tmp_path / "i.png")
    Image.fromarray(np.full((48, 40), 128, np.uint8)).save(tmp_path / "m.png")
    assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat", "--out",
                 str(tmp_path / "o")] + FAST) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "everywhere" in err and "no boundary" in err


@pytest.mark.parametrize("content, fragment", [
    ('{"size": "512"}', "size='512'"), ('{"band": 0.5}', "band=0.5"), ('{"beta": null}', "beta=None"),
    ('{"timestep": 400.5}', "timestep=400.5"), ('{"size": 512', "cannot read --config"), ("[1, 2]", "JSON list"),
])
@pytest.mark.parametrize("command", ["refine", "eval"])
def test_config_files_with_wrong_types_are_one_line_errors(tmp_path, capsys, model_loads, content, fragment,
                                                          command):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    if command == "refine":
        _image(tmp_path / "i.png")
        _mask(tmp_path / "m.png")
        argv = ["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat", "--selfcheck"]
    else:
        argv = ["eval", str(tmp_path), "--protocol", "perturb-0.8", "--methods", "g4seg", "--selfcheck"]
    assert main(argv + ["--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err
    assert model_loads == []


def test_out_may_not_be_the_input_folder(tmp_path, capsys, model_loads):
    images, masks = _folders(tmp_path, ("a",))
    for out, what in ((images, "is the image folder"), (masks, "is the mask folder")):
        assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(out)] + FAST) == 2
        assert what in capsys.readouterr().err
    assert model_loads == [] and sorted(p.name for p in images.iterdir()) == ["a.png"]


def test_unwritable_out_is_one_line_before_models(tmp_path, capsys, model_loads, monkeypatch):
    import g4seg_core.files.output_files as output_files

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # tests run as root: chmod would not stop us

    monkeypatch.setattr(output_files.tempfile, "mkstemp", denied)
    _image(tmp_path / "i.png")
    _mask(tmp_path / "m.png")
    assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat",
                 "--out", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write into the folder (Permission denied)" in err
    assert model_loads == []


def test_each_pair_is_decoded_once(tmp_path, monkeypatch, model_loads):
    """The up-front check's decoded image and mask are the ones refined (issue 17.3), unless they would not fit
    in the memory bound, when a pair is decoded again for its run."""
    import g4seg_core.files.image_files as image_files

    images, masks = _folders(tmp_path)
    reads = []
    real = image_files.read_rgb

    def counting(path):
        reads.append(path.name)
        return real(path)

    monkeypatch.setattr(image_files, "read_rgb", counting)
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(tmp_path / "o")] + FAST) == 0
    assert sorted(reads) == ["a.png", "b.png", "c.png"]
    reads.clear()
    monkeypatch.setattr(cli, "_KEEP_DECODED_BYTES", 0)
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(tmp_path / "p")] + FAST) == 0
    assert sorted(reads) == ["a.png", "a.png", "b.png", "b.png", "c.png", "c.png"]
