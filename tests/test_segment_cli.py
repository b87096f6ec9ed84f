"""`g4seg segment`: files written, label map = the segmenter's, --refine, and `g4seg eval --coarse` reads the folder."""

import json

import numpy as np
import torch
import pytest
from PIL import Image

from g4seg_core.commands.main import main
from g4seg_core.errors import G4SegError
from g4seg_core.files.mask_files import load_label_map

FAST = ("--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32")


def _image(path, h=48, w=72, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_segment_writes_label_map_probabilities_overlay_and_report(tmp_path, capsys):
    img = _image(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert main(["segment", str(img), "--classes", "cat, sofa|couch, potted plant", "--out", str(out),
                 "--prob-threshold", "0.2", *FAST]) == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    labels = load_label_map(out / "photo.png")
    assert labels.shape == (48, 72) and set(np.unique(labels)) <= {0, 1, 2, 3}
    assert Image.open(out / "photo.png").mode == "P"
    # the raw 16-bit values
    probs = np.stack([np.asarray(Image.open(out / f"photo_{n}.png"), np.float64) / 65535
                      for n in ("cat", "sofa", "potted_plant")])
    assert probs.shape == (3, 48, 72) and probs.max() <= 1
    assert (out / "photo_overlay.jpg").is_file()
    report = json.loads((out / "photo_segment.json").read_text())
    assert report["parameters"]["prob_threshold"] == 0.2 and report["parameters"]["templates"] == "single"
    assert report["random_weights"] is True and "meaningless" in report["note"]
    assert report["synonyms"][1] == ["sofa", "couch"]
    # the label map is the argmax of the written probabilities where the best one is >= the threshold
    # (up to 16-bit rounding; background probabilities are not written, so only class pixels are checked)
    fg = labels > 0
    assert fg.any()
    labelled = np.take_along_axis(probs, (labels.astype(int) - 1).clip(0)[None], 0)[0]
    assert np.all(labelled[fg] >= probs.max(0)[fg] - 2 / 65535)
    assert np.all(labelled[fg] >= 0.2 - 1 / 65535)


def test_segment_refine_and_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _image(folder / "a.png")
    _image(folder / "b.jpg", 40, 40, seed=1)
    out = tmp_path / "out"
    # random weights: dog's map lies in about 0.7..1.0 everywhere, so only a threshold of 0.9 cuts a boundary in it
    assert main(["segment", str(folder), "--classes", "cat, dog", "--out", str(out), "--refine", "--size", "64",
                 "--prob-threshold", "0", "--background", "none", "--threshold", "0.9", *FAST]) == 0
    for stem in ("a", "b"):
        report = json.loads((out / f"{stem}_segment.json").read_text())
        assert "selfcheck" in report["refine_models"]
        refined = load_label_map(out / "refined" / f"{stem}.png")
        assert refined.shape == load_label_map(out / f"{stem}.png").shape
        assert report["refine"]["refined_classes"]  # multiclass.refine_classes' rule: a boundary at the threshold
    (folder / "broken.png").write_bytes(b"not a picture")  # a folder run goes on past it, then exits 1
    assert main(["segment", str(folder), "--classes", "cat", "--out", str(tmp_path / "o2"), *FAST]) == 1
    assert (tmp_path / "o2" / "a.png").is_file() and (tmp_path / "o2" / "b.png").is_file()
    assert main(["segment", str(folder / "broken.png"), "--classes", "cat", "--out", str(out), *FAST]) == 2
    assert main(["segment", str(folder), "--classes", " , ", "--out", str(out), *FAST]) == 2
    assert main(["segment", str(folder), "--classes", "cat, cat", "--out", str(out), *FAST]) == 2
    assert main(["segment", str(folder), "--classes", "cat", "--out", str(out), *FAST, "--stride", "500"]) == 2
    _image(folder / "a.jpg")  # a.png and a.jpg would both write OUT/a.png: refused before any work
    assert main(["segment", str(folder), "--classes", "cat", "--out", str(tmp_path / "o3"), *FAST]) == 2
    assert not (tmp_path / "o3").exists() or not any((tmp_path / "o3").iterdir())


def test_segment_output_is_an_eval_coarse_source(tmp_path):
    from g4seg_core.evaluation.datasets import VOCStyleDataset

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    _image(root / "JPEGImages" / "2007_000001.jpg")
    Image.fromarray(np.zeros((48, 72), np.uint8)).save(root / "SegmentationClass" / "2007_000001.png")
    out = tmp_path / "coarse"
    assert main(["segment", str(root / "JPEGImages"), "--classes", "voc", "--out", str(out),
                 "--prob-threshold", "0", *FAST]) == 0
    labels = load_label_map(out / "2007_000001.png")
    data = VOCStyleDataset(root, coarse_dir=str(out))
    sample = data.load("2007_000001")
    assert set(sample.coarse) == set(int(c) for c in np.unique(labels) if c > 0)
    for c, mask in sample.coarse.items():
        assert np.array_equal(mask > 0.5, labels == c)
    assert (out / "2007_000001_potted_plant.png").is_file() and (out / "2007_000001_tv_monitor.png").is_file()
    # and the whole eval command takes the folder as its coarse source
    runs = tmp_path / "runs"
    assert main(["eval", str(root), "--coarse", str(out), "--methods", "none", "--out", str(runs), "--no-progress"]) == 0
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["methods"]["none"]["num_images"] == 1


def test_class_file_names_collide_loudly():
    from g4seg_core.commands.segment import class_file_names

    assert class_file_names(["potted plant", "tv/monitor"]) == ["potted_plant", "tv_monitor"]
    with pytest.raises(G4SegError, match="collide"):
        class_file_names(["a b", "a/b"])


def test_segment_with_weight_files(tmp_path, capsys):
    from safetensors.torch import save_file

    from test_zeroshot import sd2_like_file, tiny_visual

    text_path, _ = sd2_like_file(tmp_path)
    vision_path = tmp_path / "tiny_clip_vision.safetensors"
    save_file({"visual." + k: v.contiguous() for k, v in tiny_visual().state_dict().items()}, str(vision_path))
    img = _image(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert main(["segment", str(img), "--classes", "cat, dog", "--out", str(out), "--text", str(text_path),
                 "--clip", str(vision_path), "--templates", "single", "--short-side", "64", "--window", "64",
                 "--stride", "32", "--device", "cpu", "--dtype", "auto"]) == 0
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err
    report = json.loads((out / "photo_segment.json").read_text())
    assert report["random_weights"] is False and report["text"] == str(text_path)
    assert report["clip"] == str(vision_path) and report["dtype"]
    assert "note" not in report
    # an SD1-style text file is refused with the CLIP to use
    sd1 = tmp_path / "sd15.safetensors"
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)},
              str(sd1))
    assert main(["segment", str(img), "--classes", "cat", "--out", str(out), "--text", str(sd1),
                 "--clip", str(vision_path)]) == 2
    assert "clip_vision_h" in capsys.readouterr().err


@pytest.mark.parametrize("refined", [False, True])
def test_segment_then_eval_scores_classes_by_name(tmp_path, refined):
    """`segment --classes cat` labels the cat 1; eval maps it to VOC's cat (8) by the names the PNG records,
    never to VOC's class 1 (aeroplane)."""
    from g4seg_core.files.mask_files import label_map_names

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass"):
        (root / d).mkdir(parents=True)
    _image(root / "JPEGImages" / "a.jpg")
    out = tmp_path / "coarse"
    extra = ["--refine", "--size", "64", "--grid", "0"] if refined else []
    assert main(["segment", str(root / "JPEGImages"), "--classes", "cat", "--out", str(out), "--prob-threshold",
                 "0.5", *FAST, *extra]) == 0
    coarse = out / "refined" if refined else out
    labels = load_label_map(coarse / "a.png")
    assert label_map_names(coarse / "a.png") == ["background", "cat"]
    if not (labels == 1).any() or (labels == 1).all():  # random weights: make the map hold both on purpose
        from g4seg_core.files.mask_files import save_label_map_png

        labels = np.zeros_like(labels)
        labels[10:30, 10:50] = 1
        save_label_map_png(labels, coarse / "a.png", label_names=["background", "cat"])
    # the ground truth: the segmenter's cat region is VOC's cat (8)
    Image.fromarray(np.where(labels == 1, 8, 0).astype(np.uint8)).save(root / "SegmentationClass" / "a.png")
    runs = tmp_path / "runs"
    assert main(["eval", str(root), "--coarse", str(coarse), "--methods", "none", "--out", str(runs),
                 "--no-progress"]) == 0
    per_class = json.loads((runs / "summary.json").read_text())["methods"]["none"]["after"]["per_class_iou"]
    assert per_class["cat"] == pytest.approx(100.0) and per_class["aeroplane"] is None


def test_eval_refuses_a_named_class_the_dataset_lacks(tmp_path, capsys):
    from g4seg_core.files.mask_files import save_label_map_png

    root = tmp_path / "voc"
    for d in ("JPEGImages", "SegmentationClass", "coarse"):
        (root / d).mkdir(parents=True)
    _image(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.zeros((48, 72), np.uint8)).save(root / "SegmentationClass" / "a.png")
    labels = np.zeros((48, 72), np.uint8)
    labels[5:20, 5:20] = 1
    save_label_map_png(labels, root / "coarse" / "a.png", label_names=["background", "grass"])
    assert main(["eval", str(root), "--coarse", str(root / "coarse"), "--methods", "none", "--out",
                 str(tmp_path / "runs"), "--no-progress"]) == 1  # its one image failed: listed, exit 1
    err = capsys.readouterr().err
    assert "1 = 'grass'" in err and "--class-names" in err
