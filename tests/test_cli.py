"""The `g4seg` command line on tiny random-weight models."""

import json

import numpy as np
import pytest
from PIL import Image

from g4seg_core.commands.main import main


def _write_pair(folder, stem="img", h=48, w=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / f"{stem}.png")
    mask = np.zeros((h, w), np.uint8)
    mask[10:35, 8:30] = 255
    Image.fromarray(mask).save(folder / f"{stem}_mask.png")
    return folder / f"{stem}.png", folder / f"{stem}_mask.png"


def test_refine_writes_every_output(tmp_path, capsys):
    image, mask = _write_pair(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["refine", str(image), str(mask), "--label", "cat", "--out", str(out), "--selfcheck",
                 "--size", "64", "--grid", "0", "--beta", "0.9"])
    assert code == 0
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    prob = np.asarray(Image.open(out / "img_refined_prob.png"))
    assert prob.dtype == np.uint16 and prob.shape == (48, 40)
    assert np.asarray(Image.open(out / "img_refined_mask.png")).shape == (48, 40)
    assert (out / "img_overlay.png").exists() and (out / "img_generated.png").exists()
    report = json.loads((out / "img_g4seg.json").read_text())
    assert report["parameters"]["beta"] == 0.9 and report["parameters"]["size"] == 64
    assert "selfcheck" in report["models"] and "total" in report["timings_s"]


def test_refine_folders(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for stem in ("a", "b"):
        image, mask = _write_pair(tmp_path / "tmp", stem)
        images.mkdir(exist_ok=True)
        masks.mkdir(exist_ok=True)
        image.rename(images / f"{stem}.png")
        mask.rename(masks / f"{stem}.png")
    code = main(["refine", str(images), str(masks), "--label", "dog", "--out", str(tmp_path / "out"),
                 "--selfcheck", "--size", "64"])
    assert code == 0
    assert (tmp_path / "out" / "a_refined_mask.png").exists() and (tmp_path / "out" / "b_g4seg.json").exists()


def test_missing_weights_say_where_we_looked(tmp_path, monkeypatch, capsys):
    for var in ("G4SEG_CHECKPOINT", "G4SEG_CLIP", "COMFYUI_PATH"):
        monkeypatch.delenv(var, raising=False)
    image, mask = _write_pair(tmp_path / "in")
    code = main(["refine", str(image), str(mask), "--label", "cat", "--out", str(tmp_path / "out"),
                 "--comfyui-dir", str(tmp_path / "no_comfy")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--checkpoint" in err and "G4SEG_CHECKPOINT" in err
    code = main(["refine", str(image), str(mask), "--label", "cat", "--out", str(tmp_path / "out"),
                 "--comfyui-dir", str(tmp_path / "no_comfy"), "--selfcheck-if-missing", "--size", "64"])
    assert code == 0 and "RANDOM WEIGHTS" in capsys.readouterr().err


@pytest.mark.parametrize("args, fragment", [
    (["--size", "100"], "multiple of 64"),
    (["--band", "0.7", "0.2"], "band"),
])
def test_bad_parameters_exit_2(tmp_path, capsys, args, fragment):
    image, mask = _write_pair(tmp_path / "in")
    code = main(["refine", str(image), str(mask), "--label", "cat", "--out", str(tmp_path / "o"), "--selfcheck"]
                + args)
    assert code == 2 and fragment in capsys.readouterr().err


def test_unreadable_and_non_rgb_inputs(tmp_path, capsys):
    image, mask = _write_pair(tmp_path / "in")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["refine", str(broken), str(mask), "--label", "cat", "--out", str(tmp_path / "o"),
                 "--selfcheck"]) == 2
    assert "cannot read" in capsys.readouterr().err
    gray = tmp_path / "gray.png"
    Image.open(image).convert("L").save(gray)
    assert main(["refine", str(gray), str(mask), "--label", "cat", "--out", str(tmp_path / "o"),
                 "--selfcheck"]) == 2
    assert "--convert-rgb" in capsys.readouterr().err
    assert main(["refine", str(gray), str(mask), "--label", "cat", "--out", str(tmp_path / "o"),
                 "--selfcheck", "--convert-rgb", "--size", "64"]) == 0


def test_selfcheck_command(capsys):
    assert main(["selfcheck"]) == 0
    assert "selfcheck passed" in capsys.readouterr().out


def test_bench_refuses_half_precision_on_cpu_before_building(capsys):
    assert main(["bench", "--device", "cpu", "--dtype", "float16"]) == 2
    assert "--dtype float32" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--batch", "-1"]) == 2
    assert "--batch -1" in capsys.readouterr().err


def test_bench_checks_its_json_path_before_building(tmp_path, capsys, monkeypatch):
    from g4seg_core.commands import bench

    monkeypatch.setattr(bench, "bench_models", lambda: pytest.fail("models built before the --json check"))
    assert main(["bench", "--device", "cpu", "--dtype", "float32", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["bench", "--device", "cpu", "--dtype", "float32", "--json", str(blocker / "b.json")]) == 2
    assert f"{blocker} is a file" in capsys.readouterr().err


def test_a_broken_eval_module_is_loud_not_a_missing_subcommand(monkeypatch):
    """`g4seg` imports the eval sub-command directly: a broken import fails instead of hiding `eval`."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "g4seg_core.commands.evaluate", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "g4seg_core.commands.main", raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("g4seg_core.commands.main")
    monkeypatch.undo()
    importlib.import_module("g4seg_core.commands.main")


def test_eval_cli_does_not_import_the_main_cli():
    """No import circle: g4seg_core/commands/evaluate.py takes shared options from cli_options, not cli."""
    import ast
    from pathlib import Path

    import g4seg_core.commands.evaluate as eval_cli

    tree = ast.parse(Path(eval_cli.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "cli" not in imported and "g4seg_core.commands.main" not in imported
