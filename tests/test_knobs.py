"""Every knob declared once (g4seg_core.config.KNOBS): config validation, CLI flags and node widgets come from it."""

import json
import os

import pytest

from g4seg_core.commands.main import build_parser
from g4seg_core.commands.options import config_from_args
from g4seg_core.config import KNOBS, G4SegConfig
from g4seg_core.errors import G4SegError
from nodes import NODE_CLASS_MAPPINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = os.path.join(ROOT, "tests", "data", "node_widgets_before_issue9.json")


def _widget_rows(cls, section):
    rows = []
    for name, spec in cls.INPUT_TYPES().get(section, {}).items():
        kind = spec[0] if isinstance(spec[0], str) else list(spec[0])
        options = {k: v for k, v in (spec[1] if len(spec) > 1 else {}).items() if k != "tooltip"}
        rows.append([name, kind, options])
    return rows


@pytest.mark.parametrize("node_id", sorted(json.load(open(BEFORE))))
def test_node_widgets_keep_ids_order_and_defaults(node_id):
    """Saved workflows keep working: the widgets of every node as they were before the knob table
    (ids, order, types, defaults, ranges); new inputs may only be appended."""
    before = json.load(open(BEFORE))[node_id]
    cls = NODE_CLASS_MAPPINGS[node_id]
    required = _widget_rows(cls, "required")
    assert required[:len(before["required"])] == before["required"]
    assert node_id == "G4SegLoadCoarseMask" or len(required) == len(before["required"])
    optional = _widget_rows(cls, "optional")
    assert optional[:len(before["optional"])] == before["optional"]


def test_every_widget_has_a_tooltip():
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        for section in ("required", "optional"):
            for name, spec in cls.INPUT_TYPES().get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node_id, name)


def test_cli_has_one_flag_per_knob_with_its_default_in_the_help():
    parser = build_parser()
    refine = parser._subparsers._group_actions[0].choices["refine"]
    dests = {a.dest: a for a in refine._actions}
    for knob in KNOBS:
        assert knob.name in dests, knob.name
        assert knob.help.split(" ")[0] in dests[knob.name].help


def _config_file(tmp_path, values):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    args = build_parser().parse_args(["refine", "i.png", "m.png", "--label", "cat", "--out", "o",
                                      "--config", str(path)])
    return config_from_args(args)


@pytest.mark.parametrize("values, fragment", [
    ({"size": "512"}, "size='512': use a whole number"),
    ({"band": 0.5}, "band=0.5: use two numbers"),
    ({"beta": None}, "beta=None: use a number"),
    ({"timestep": 400.5}, "timestep=400.5: use a whole number in 1..999"),
    ({"timestep": True}, "timestep=True"),
    ({"emi_mode": "dense"}, "choose one of additive, densediffusion, off"),
    ({"prompt_template": 3}, "prompt_template=3: use a string"),
    ({"band": [0.7, 0.2]}, "low <= high"),
    ({"size": 500}, "multiple of 64"),
    ({"correspondence_grid": 4}, "0 (the CLIP patch grid) or 8..128"),
    ({"sizes": 512}, "unknown G4Seg parameter"),
])
def test_json_config_values_are_type_checked(tmp_path, values, fragment):
    with pytest.raises(G4SegError) as info:
        _config_file(tmp_path, values)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_json_config_and_flags(tmp_path):
    config = _config_file(tmp_path, {"size": 256, "band": [0.1, 0.7], "beta": 1, "device": None})
    assert config.size == 256 and config.band == (0.1, 0.7) and config.beta == 1.0 and isinstance(config.beta, float)
    with pytest.raises(G4SegError, match="not a JSON object|must be an object"):
        _config_file(tmp_path, [1, 2])


def test_size_zero_keeps_the_image_size_on_both_sides():
    assert G4SegConfig(size=0).size == 0


def test_config_from_widgets():
    config = G4SegConfig.from_widgets({"grid": 32, "schedule": "t5", "band_low": 0.1, "cfg": 2.0})
    assert (config.correspondence_grid, config.emi_schedule, config.band, config.cfg_scale) == (32, "t5", (0.1, 0.6), 2.0)
    with pytest.raises(G4SegError, match="band"):
        G4SegConfig.from_widgets({"band_low": 0.9, "band_high": 0.5})
    with pytest.raises(G4SegError, match="not a G4Seg parameter"):
        G4SegConfig.from_widgets({"model": None})
