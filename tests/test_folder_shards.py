"""Scale-out for folders (issue 16.5): `g4seg refine` and `g4seg segment` on a folder split over processes
as `g4seg eval` does (RANK / WORLD_SIZE from torchrun or accelerate, set by hand here): each process its
share, --skip-existing resumes, and process 0 merges one run report."""

import json

import numpy as np
import pytest
from PIL import Image

from g4seg_core.commands.main import main

STEMS = ("a", "b", "c", "d", "e")


def _folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for stem in STEMS:
        Image.fromarray((rng.random((40, 32, 3)) * 255).astype(np.uint8)).save(images / f"{stem}.png")
        m = np.zeros((40, 32), np.uint8)
        m[8:30, 6:24] = 255
        Image.fromarray(m).save(masks / f"{stem}.png")
    Image.fromarray(np.zeros((40, 32), np.uint8)).save(masks / "c.png")  # an empty mask: c fails
    return images, masks


def _as_process(monkeypatch, rank, world=2):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.mark.parametrize("command", ["refine", "segment"])
def test_two_processes_share_a_folder_and_merge_one_report(tmp_path, monkeypatch, capsys, command):
    images, masks = _folders(tmp_path)
    out = tmp_path / "out"
    if command == "refine":
        argv = ["refine", str(images), str(masks), "--label", "cat", "--out", str(out), "--selfcheck", "--size", "64",
                "--grid", "0"]
        report_name, marker = "g4seg_run.json", "_g4seg.json"
    else:
        argv = ["segment", str(images), "--classes", "cat", "--out", str(out), "--selfcheck", "--templates",
                "single", "--short-side", "64", "--window", "64", "--stride", "32"]
        report_name, marker = "g4seg_segment_run.json", "_segment.json"
    expected_fail = {"c.png"} if command == "refine" else set()

    _as_process(monkeypatch, 0)  # process 0 before process 1 has finished: its share, no merged report yet
    assert main(argv) == (1 if expected_fail else 0)
    err = capsys.readouterr().err
    assert "process 0 of 2: 3 of" in err and "have not finished" in err and not (out / report_name).exists()
    assert sorted(p.name.split("_")[0] for p in out.glob(f"*{marker}")) == sorted({"a", "e", "c"} - {"c"} if
                                                                                  expected_fail else {"a", "c", "e"})
    _as_process(monkeypatch, 1)
    assert main(argv) == 0
    assert sorted(p.name.split("_")[0] for p in out.glob(f"*{marker}")) == \
        sorted(s for s in STEMS if f"{s}.png" not in expected_fail)
    _as_process(monkeypatch, 0)  # process 0 again: everything of its share is done, the report is merged
    assert main(argv + ["--skip-existing"]) == (1 if expected_fail else 0)
    merged = json.loads((out / report_name).read_text())
    assert merged["images"] == len(STEMS) and merged["processes"] == 2
    assert {f["image"] for f in merged["failed"]} == expected_fail
    assert sorted(merged["done"] + merged["skipped"] + [f["image"] for f in merged["failed"]]) == \
        [f"{s}.png" for s in STEMS]
    assert "all 2 processes: 5 image(s)" in capsys.readouterr().err


def test_a_bad_rank_is_one_line(tmp_path, monkeypatch, capsys):
    images, masks = _folders(tmp_path)
    _as_process(monkeypatch, 3, world=2)
    assert main(["refine", str(images), str(masks), "--label", "cat", "--out", str(tmp_path / "o"),
                 "--selfcheck"]) == 2
    assert "RANK must be 0..WORLD_SIZE-1" in capsys.readouterr().err
