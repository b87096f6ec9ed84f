"""Reports and messages that are true (issue 18.8): a class may not be called 'background' (label 0's name),
and every message names an option, command or file that exists."""

import re

import numpy as np
import pytest
from PIL import Image

from g4seg_core.commands.main import main
from g4seg_core.errors import G4SegError
from g4seg_core.files.mask_files import save_label_map_png
from g4seg_core.zeroshot import parse_classes


@pytest.mark.parametrize("classes", ["cat, background", "Background", "sofa|background"])
def test_a_class_named_background_is_refused(classes, tmp_path, capsys):
    with pytest.raises(G4SegError, match="label 0"):
        parse_classes(classes)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--classes", classes, "--out", str(tmp_path / "o"),
                 "--selfcheck"]) == 2
    assert "'background' names label 0" in capsys.readouterr().err


def test_label_fractions_add_up(tmp_path):
    import json

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["segment", str(tmp_path / "a.png"), "--classes", "cat, backdrop", "--out", str(tmp_path / "o"),
                 "--selfcheck", "--templates", "single", "--short-side", "64", "--window", "64", "--stride", "32",
                 "--prob-threshold", "0"]) == 0
    fractions = json.loads((tmp_path / "o" / "a_segment.json").read_text())["label_fractions"]
    assert list(fractions) == ["background", "cat", "backdrop"]
    assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-5)


def test_mask_class_name_error_gives_the_index_range_it_takes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["refine", "i.png", "m.png", "--label", "x", "--out", str(tmp_path), "--mask-class", "giraffe"])
    err = capsys.readouterr().err
    assert "0..254" in err and "0..20" not in err


def test_palette_mask_message_names_the_option(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "i.png")
    labels = np.zeros((32, 32), np.uint8)
    labels[5:20, 5:20] = 8
    save_label_map_png(labels, tmp_path / "m.png")
    assert main(["refine", str(tmp_path / "i.png"), str(tmp_path / "m.png"), "--label", "cat", "--out",
                 str(tmp_path / "o"), "--selfcheck"]) == 2
    err = capsys.readouterr().err
    assert "--mask-class" in err and "load_label_map" not in err


@pytest.mark.parametrize("command", ["refine", "segment", "eval", "eval-merge", "bench", "selfcheck"])
def test_help_names_only_existing_flags(capsys, command):
    """`eval --help` once said --method for --methods."""
    from g4seg_core.commands.main import build_parser

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    known = {s for a in sub._actions for s in a.option_strings}
    assert flags <= known, flags - known
