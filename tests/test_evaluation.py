"""`g4seg eval` end to end on a tiny VOC-style dataset built in tmp_path."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from g4seg_core.commands.main import main
from g4seg_core.evaluation.metrics import ConfusionMatrix
from g4seg_core.files.palettes import voc_palette

ROOT = Path(__file__).resolve().parents[1]


def make_voc(root: Path, n: int = 4, size: int = 64) -> Path:
    """n images of coloured shapes (cat disk, dog/person, sometimes an aeroplane box)."""
    rng = np.random.default_rng(0)
    pal = voc_palette()
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    ids = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        lab = np.zeros((size, size), np.uint8)
        img = np.zeros((size, size, 3)) + rng.integers(0, 80, 3)
        cls = (8, 12, 15)[i % 3]
        disk = (yy - (22 + 3 * i)) ** 2 + (xx - 30) ** 2 < (11 + i) ** 2
        lab[disk] = cls
        img[disk] = (200, 60 + 20 * i, 40)
        if i % 2 == 0:
            box = (abs(yy - 48) < 8) & (abs(xx - 12) < 9)
            lab[box] = 1
            img[box] = (40, 200, 90)
        lab[0, :] = 255  # an ignored row
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        sid = f"2007_{i:06d}"
        ids.append(sid)
        Image.fromarray(img).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
        p = Image.fromarray(lab, "P")
        p.putpalette(pal.flatten().tolist())
        p.save(root / "SegmentationClass" / f"{sid}.png")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def run(*argv):
    return main(["eval", *map(str, argv), "--no-progress"])


def load_summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def records(out):
    recs = []
    for p in sorted(Path(out).glob("results*.jsonl")):
        recs += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    for r in recs:
        r.pop("time_s", None)
    return sorted(recs, key=lambda r: (r["id"], r["method"]))


BASE = ("--split", "val", "--protocol", "perturb-0.8", "--methods", "none,morphology")


def test_eval_end_to_end_files_and_numbers(voc, tmp_path):
    out = tmp_path / "out"
    assert run(voc, *BASE, "--out", out) == 0
    for name in ("results.jsonl", "summary.json", "summary.csv", "report.html", "grid.png", "run.json"):
        assert (out / name).is_file(), name
    summary = load_summary(out)
    assert list(summary["methods"]) == ["none", "morphology"]
    none = summary["methods"]["none"]
    assert none["num_images"] == 4
    assert none["before"] == none["after"]                 # identity refiner == coarse input
    assert none["gain"]["miou"] == 0.0
    assert 0 < none["before"]["miou"] < 100
    # Table VII buckets: (image, fg class) samples, 6 here (4 disks + 2 boxes)
    assert sum(b["samples"] for b in none["buckets"].values()) == none["samples"] == 6
    # mIoU recomputed by hand from the saved label maps
    cm = ConfusionMatrix(21)
    for sid in (voc / "ImageSets/Segmentation/val.txt").read_text().split():
        gt = np.array(Image.open(voc / "SegmentationClass" / f"{sid}.png"))
        pred = np.array(Image.open(out / "pred" / "morphology" / f"{sid}.png"))
        cm.update(pred, gt)
    assert summary["methods"]["morphology"]["after"]["miou"] == pytest.approx(100 * cm.miou())
    # csv: methods x metrics
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [r["method"] for r in rows] == ["none", "morphology"]
    assert float(rows[1]["miou_after"]) == pytest.approx(100 * cm.miou(), abs=1e-3)
    html = (out / "report.html").read_text()
    assert "grid.png" in html and "<svg" in html and "Table VII" in html
    with Image.open(out / "grid.png") as im:
        assert im.width > 4 * 64 and im.height > 160


def test_deterministic_under_seed(voc, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(voc, *BASE, "--out", a, "--seed", "3") == 0
    assert run(voc, *BASE, "--out", b, "--seed", "3") == 0
    assert run(voc, *BASE, "--out", c, "--seed", "4") == 0
    assert records(a) == records(b)
    assert load_summary(a)["methods"] == load_summary(b)["methods"]
    assert records(a) != records(c)


def test_resume_after_interruption_gives_identical_totals(voc, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert run(voc, *BASE, "--out", full) == 0

    # Interrupt a second run after three records, leave a half-written line behind.
    import g4seg_core.commands.evaluate as eval_cli

    real = eval_cli.evaluate_image
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        for item in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt
            yield item

    part = tmp_path / "part"
    monkeypatch.setattr(eval_cli, "evaluate_image", flaky)
    assert run(voc, *BASE, "--out", part) == 130  # Ctrl-C: a one-line message, no traceback
    monkeypatch.setattr(eval_cli, "evaluate_image", real)
    assert len((part / "results.jsonl").read_text().splitlines()) == 3
    with open(part / "results.jsonl", "a") as fh:
        fh.write('{"id": "2007_000002", "method": "no')   # killed mid-write
    assert run(voc, *BASE, "--out", part) == 0
    assert records(part) == records(full)                 # nothing lost, nothing doubled
    assert load_summary(part)["methods"] == load_summary(full)["methods"]
    # rerunning a finished run does no work and changes nothing
    assert run(voc, *BASE, "--out", part) == 0
    assert load_summary(part)["methods"] == load_summary(full)["methods"]


def test_other_run_in_same_folder_is_refused(voc, tmp_path, capsys):
    out = tmp_path / "o"
    assert run(voc, *BASE, "--out", out) == 0
    assert run(voc, "--split", "val", "--protocol", "dilate-5", "--methods", "none", "--out", out) == 2
    assert "different run" in capsys.readouterr().err
    assert run(voc, "--split", "val", "--protocol", "dilate-5", "--methods", "none", "--out", out,
               "--overwrite") == 0


def test_two_processes_merged_equal_one_process(voc, tmp_path):
    single = tmp_path / "single"
    assert run(voc, *BASE, "--out", single) == 0
    sharded = tmp_path / "sharded"
    env = dict(os.environ, PYTHONPATH=str(ROOT), WORLD_SIZE="2")
    procs = []
    for rank in (0, 1):  # as torchrun would start them: RANK / WORLD_SIZE in the environment
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "g4seg_core.commands.main", "eval", str(voc), *BASE, "--out", str(sharded),
             "--no-progress"], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=str(ROOT),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (sharded / "results.rank0.jsonl").is_file() and (sharded / "results.rank1.jsonl").is_file()
    assert not (sharded / "results.jsonl").exists()
    # rank 0 waited for rank 1 and merged
    assert load_summary(sharded)["methods"] == load_summary(single)["methods"]
    assert records(sharded) == records(single)
    # an explicit merge (another machine, or later) gives the same totals
    (sharded / "summary.json").unlink()
    assert main(["eval", "--merge", str(sharded)]) == 0
    assert load_summary(sharded)["methods"] == load_summary(single)["methods"]
    assert main(["eval-merge", str(sharded)]) == 0
    assert load_summary(sharded)["methods"] == load_summary(single)["methods"]


def test_explicit_shards_in_process(voc, tmp_path):
    single = tmp_path / "single"
    assert run(voc, *BASE, "--out", single) == 0
    out = tmp_path / "manual"
    for i in (0, 1):
        assert run(voc, *BASE, "--out", out, "--shard-index", i, "--num-shards", 2) == 0
    assert not (out / "summary.json").exists()           # shard 0 did not wait for shard 1
    assert main(["eval", "--merge", str(out)]) == 0
    assert load_summary(out)["methods"] == load_summary(single)["methods"]
    # shard 0 finishing last merges by itself when every shard is done
    out2 = tmp_path / "manual2"
    for i in (1, 0):
        assert run(voc, *BASE, "--out", out2, "--shard-index", i, "--num-shards", 2) == 0
    assert load_summary(out2)["methods"] == load_summary(single)["methods"]


def test_coarse_folders_label_maps_and_class_probabilities(voc, tmp_path):
    from g4seg_core.files.mask_files import save_probability_png16
    from g4seg_core.evaluation.perturb import make_coarse

    ids = (voc / "ImageSets/Segmentation/val.txt").read_text().split()
    labels_dir, probs_dir = tmp_path / "coarse_labels", tmp_path / "coarse_probs"
    labels_dir.mkdir()
    probs_dir.mkdir()
    pal = voc_palette().flatten().tolist()
    names = {1: "aeroplane", 8: "cat", 12: "dog", 15: "person"}
    cm = ConfusionMatrix(21)
    for sid in ids:
        gt = np.array(Image.open(voc / "SegmentationClass" / f"{sid}.png"))
        coarse = np.zeros_like(gt)
        for c in sorted(set(np.unique(gt).tolist()) - {0, 255}):
            m = make_coarse(gt == c, "dilate-2", 0) > 0.5
            coarse[m] = c
            save_probability_png16(make_coarse(gt == c, "lowres-8", 0), probs_dir / f"{sid}_{names[c]}.png")
        p = Image.fromarray(coarse, "P")
        p.putpalette(pal)
        p.save(labels_dir / f"{sid}.png")
        cm.update(coarse, gt)
    out = tmp_path / "lab"
    assert run(voc, "--split", "val", "--coarse", labels_dir, "--methods", "none", "--out", out) == 0
    assert load_summary(out)["methods"]["none"]["before"]["miou"] == pytest.approx(100 * cm.miou())
    out = tmp_path / "prob"
    assert run(voc, "--split", "val", "--coarse", probs_dir, "--methods", "none,guided", "--out", out) == 0
    s = load_summary(out)["methods"]
    assert s["none"]["num_images"] == 4 and s["none"]["before"]["miou"] > 70


def test_densecrf_method(voc, tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    out = tmp_path / "crf"
    assert run(voc, "--split", "val", "--protocol", "perturb-0.8", "--methods", "none,densecrf",
               "--out", out) == 0
    s = load_summary(out)["methods"]["densecrf"]
    assert s["gain"]["miou"] > 0                          # two-colour shapes: the CRF snaps to edges


def test_g4seg_with_tiny_pipeline(voc, tmp_path):
    pytest.importorskip("g4seg_core.models.tiny")  # lands with pipeline.py; then this really runs
    out = tmp_path / "g4"
    methods = "none,g4seg" + (",g4seg+densecrf" if _has_crf() else "")
    assert run(voc, "--split", "val", "--limit", "2", "--protocol", "lowres-8", "--methods", methods,
               "--selfcheck", "--size", "64", "--out", out) == 0
    s = load_summary(out)
    assert set(s["methods"]) == set(methods.split(","))
    assert s["methods"]["g4seg"]["num_images"] == 2
    assert "random" in s["run"]["models"]
    assert "RANDOM" in (out / "report.html").read_text().upper()


def _has_crf():
    from g4seg_core.evaluation.densecrf import crf_available

    return crf_available()


def test_g4seg_method_code_path_with_a_stub_pipeline(voc, tmp_path, monkeypatch):
    """The g4seg / g4seg+X wiring (config passed through, .probs used), without models."""
    import g4seg_core.commands.options as cli_options
    from g4seg_core.evaluation.metrics import grey_dilate_disk

    seen = []

    class Result:
        def __init__(self, probs):
            self.probs = probs

    class StubPipeline:
        def refine_classes(self, image, masks, config=None):
            seen.extend((image.shape, mask.shape, label, config.beta) for label, mask in masks.items())
            return Result({label: grey_dilate_disk(mask, 1) for label, mask in masks.items()})

    monkeypatch.setattr(cli_options, "build_pipeline", lambda args, config: (StubPipeline(), "stub"))
    out = tmp_path / "stub"
    assert run(voc, "--split", "val", "--protocol", "erode-2", "--methods", "none,g4seg,g4seg+morphology",
               "--beta", "0.9", "--out", out) == 0
    s = load_summary(out)["methods"]
    assert s["g4seg"]["gain"]["miou"] > 0                 # dilating an eroded mask helps
    assert {lab for _, _, lab, _ in seen} == {"aeroplane", "cat", "dog", "person"}
    assert all(beta == 0.9 for *_, beta in seen)
    # 6 (image, class) pairs; g4seg and g4seg+morphology share one G4Seg run per pair
    assert len(seen) == 6
    assert s["g4seg+morphology"]["num_images"] == 4


# ----------------------------------------------------------------------------- baselines

def test_baseline_refiners():
    from g4seg_core.evaluation.baselines import box_filter, make_refiner
    from g4seg_core.errors import G4SegError
    from g4seg_core.evaluation.metrics import iou

    rng = np.random.default_rng(0)
    x = rng.random((9, 11))
    ref = np.array([[x[max(0, i - 2):i + 3, max(0, j - 2):j + 3].mean() for j in range(11)] for i in range(9)])
    np.testing.assert_allclose(box_filter(x, 2), ref, atol=1e-12)

    yy, xx = np.mgrid[:64, :64]
    gt = (yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2
    img = np.where(gt[..., None], [220, 40, 40], [30, 60, 200]).astype(np.uint8)
    noisy = gt.astype(np.float32)
    noisy[5, 5] = 1.0                                    # a speck
    noisy[32, 32] = 0.0                                  # a hole
    assert np.array_equal(make_refiner("none")(img, {"x": noisy})["x"], noisy)
    morph = make_refiner("morphology")(img, {"x": noisy, "y": 1 - noisy})
    assert morph["x"][5, 5] == 0.0 and morph["x"][32, 32] == 1.0
    assert morph["y"][5, 5] == 1.0 and morph["y"][32, 32] == 0.0  # each class on its own
    blurred = np.clip(noisy + 0.35 * (np.roll(gt, 3, 1) ^ gt), 0, 1).astype(np.float32)
    guided = make_refiner("guided")(img, {"x": blurred})["x"]
    assert guided.dtype == np.float32 and iou(guided, gt) > iou(blurred, gt) - 1e-9
    chain = make_refiner("morphology+none")
    assert np.array_equal(chain(img, {"x": noisy})["x"], morph["x"])
    with pytest.raises(G4SegError, match="g4seg\\+densecrf"):
        make_refiner("foo")
    with pytest.raises(G4SegError, match="--checkpoint"):
        make_refiner("g4seg")


def test_g4seg_refiner_is_refine_classes_run_once_per_image():
    from g4seg_core.config import G4SegConfig
    from g4seg_core.evaluation.baselines import make_refiner
    from g4seg_core.method.multiclass import refine_classes
    from g4seg_core.pipeline import G4SegPipeline

    pipe = G4SegPipeline.tiny()
    calls = []
    pipe.encode = (lambda encode: lambda pixels: calls.append("encode") or encode(pixels))(pipe.encode)
    config = G4SegConfig(size=64, correspondence_grid=0)
    shared = {}
    a = make_refiner("g4seg", pipeline=pipe, config=config, shared=shared)
    b = make_refiner("g4seg+none", pipeline=pipe, config=config, shared=shared)
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    cat, dog, absent = (np.zeros((40, 48), np.float32) for _ in range(3))
    cat[5:25, 4:30] = 1
    dog[20:38, 20:44] = 1
    probs = {"cat": cat, "dog": dog, "cow": absent}
    got = a(img, probs)
    want = refine_classes(G4SegPipeline.tiny(), img, probs, config).probs
    assert list(got) == ["cat", "dog", "cow"] and np.array_equal(got["cow"], absent)  # nothing to refine
    for name in probs:
        np.testing.assert_array_equal(got[name], want[name])
    assert not np.array_equal(got["cat"], cat)
    assert calls.count("encode") == 1
    b(img, probs)                                            # cached: same image and class maps
    assert calls.count("encode") == 1
    a(img.copy(), probs)                                     # a new image: refined again
    assert calls.count("encode") == 2


# ----------------------------------------------------------------------------- bad input (issue 12)

def test_eval_goes_on_past_bad_images_lists_them_and_resumes(tmp_path, capsys):
    voc = make_voc(tmp_path / "voc")
    full = tmp_path / "full"
    assert run(voc, *BASE, "--out", full) == 0
    jpg = voc / "JPEGImages" / "2007_000001.jpg"
    good_jpg = jpg.read_bytes()
    jpg.write_bytes(good_jpg[: len(good_jpg) // 2])  # truncated
    gt = voc / "SegmentationClass" / "2007_000003.png"
    good_gt = gt.read_bytes()
    Image.new("P", (10, 10)).save(gt)  # wrong size: found by the header check, before any model
    out = tmp_path / "out"
    capsys.readouterr()
    assert run(voc, *BASE, "--out", out) == 1
    err = capsys.readouterr().err
    assert "2 image(s) failed" in err and "2007_000001" in err and "2007_000003" in err
    assert "Traceback" not in err
    summary = load_summary(out)
    assert [f["id"] for f in summary["failures"]] == ["2007_000001", "2007_000003"]
    assert "10x10" in summary["failures"][1]["error"]
    assert summary["methods"]["none"]["num_images"] == 2
    assert "Failed images (2)" in (out / "report.html").read_text()
    # fixed files: the rerun evaluates just those two and the totals equal a clean run
    jpg.write_bytes(good_jpg)
    gt.write_bytes(good_gt)
    assert run(voc, *BASE, "--out", out) == 0
    assert "resuming: 2 of 4" in capsys.readouterr().err
    assert load_summary(out)["failures"] == []
    assert records(out) == records(full)


def test_eval_resume_drops_and_redoes_damaged_lines(voc, tmp_path, capsys):
    full = tmp_path / "full"
    assert run(voc, *BASE, "--out", full) == 0
    out = tmp_path / "out"
    assert run(voc, *BASE, "--out", out) == 0
    lines = (out / "results.jsonl").read_bytes().splitlines(keepends=True)
    recs = [json.loads(x) for x in lines]
    missing_key = dict(recs[0])
    del missing_key["before"]
    null_biou = json.loads(lines[1])
    null_biou["after"]["biou"] = None
    integer_id = {**recs[3], "id": 7}
    unknown_method = {**recs[4], "method": "renamed"}
    damaged = [json.dumps(missing_key).encode(), json.dumps(null_biou).encode(),
               lines[2].rstrip(b"\n").replace(b'"id"', b'"\xff\xfeid"'),  # invalid UTF-8
               json.dumps(integer_id).encode(), json.dumps(unknown_method).encode()]
    (out / "results.jsonl").write_bytes(b"\n".join(damaged) + b"\n" + b"".join(lines[5:]))
    capsys.readouterr()
    assert run(voc, *BASE, "--out", out) == 0
    err = capsys.readouterr().err
    assert "ignoring 5 damaged line(s)" in err and "missing key 'before'" in err and "UTF-8" in err
    assert "Traceback" not in err
    assert records(out) == records(full)
    summary = load_summary(out)
    assert list(summary["methods"]) == ["none", "morphology"]          # no bogus 'renamed' row
    assert summary["methods"] == load_summary(full)["methods"]
    assert len((out / "damaged_lines.txt").read_bytes().splitlines()) == 5
    assert run(voc, *BASE, "--out", out) == 0                          # set aside: no warning again
    assert "damaged" not in capsys.readouterr().err


def test_eval_merge_of_damaged_lines_and_run_json_never_crashes(voc, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(voc, *BASE, "--out", out) == 0
    with open(out / "results.jsonl", "ab") as fh:
        fh.write(b'{"id": "x", "method": "none", "before": null, "after": {}}\n[1, 2]\n\xc3\x28\n')
    assert main(["eval", "--merge", str(out)]) == 0
    assert "ignoring 3 damaged line(s)" in capsys.readouterr().err
    (out / "run.json").write_text('{"dataset": ')
    assert main(["eval", "--merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run.json is damaged" in err and "--overwrite" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["file", "parent_file"])
def test_eval_out_that_cannot_be_a_folder_is_one_line(voc, tmp_path, capsys, kind):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "sub"
    assert run(voc, *BASE, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out) in err and "--out" in err


def test_eval_reads_16bit_greyscale_pictures_and_refuses_duplicate_files(tmp_path, capsys):
    from g4seg_core.evaluation.datasets import VOCStyleDataset

    voc = make_voc(tmp_path / "voc")
    grey16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    (voc / "JPEGImages" / "2007_000000.jpg").unlink()
    Image.fromarray(grey16).save(voc / "JPEGImages" / "2007_000000.png")
    Image.new("RGB", (64, 64)).save(voc / "JPEGImages" / "2007_000001.png")  # next to 2007_000001.jpg
    ds = VOCStyleDataset(voc, split="val", protocol="perturb-0.8")
    image = ds.load("2007_000000").image
    np.testing.assert_array_equal(image[..., 1], np.round(grey16 / 257.0).astype(np.uint8))  # not clipped white
    assert run(voc, *BASE, "--out", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert "2007_000001: several files" in err and "2007_000001.jpg and 2007_000001.png" in err
    assert load_summary(tmp_path / "o")["methods"]["none"]["num_images"] == 3


@pytest.mark.parametrize("found", ["by the checks", "while evaluated"])
def test_eval_where_every_image_fails_exits_1_and_lists_them_once(tmp_path, capsys, found):
    """Work was tried and all of it failed: exit 1 like refine and segment, one list, no summary promised."""
    voc = make_voc(tmp_path / "voc", n=2)
    for jpg in sorted((voc / "JPEGImages").glob("*.jpg")):
        data = jpg.read_bytes()
        jpg.write_bytes(data[:300] if found == "by the checks" else data[: len(data) // 2])
    out = tmp_path / "out"
    assert run(voc, *BASE, "--out", out) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "g4seg: error" not in err
    assert err.count("2007_000000: cannot read image") == 1  # the list; and the progress line while evaluated:
    assert err.count("2007_000000: failed, going on") == (found == "while evaluated")
    assert "2 image(s) failed (also in failures.json" in err and "no summary was written" in err
    assert not (out / "summary.json").exists()
    assert [f["id"] for f in json.loads((out / "failures.json").read_text())["failures"]] == ["2007_000000",
                                                                                            "2007_000001"]
