"""Every knob of both knob sets (G4Seg's config.KNOBS, the segmenter's zeroshot.SEGMENTER_KNOBS) is accepted or
refused alike by the command line, a config file and the nodes: at its min and max, one step outside each, and
non-finite values (issues 17.4, 18.4).

The node side is what ComfyUI does with a widget value (execution.validate_inputs: convert with int()/float(),
refuse below "min" or above "max", a combo value must be one of its choices) followed by what the node function
does with it (Config.from_widgets).
"""

import contextlib
import io
import json
import math
from types import SimpleNamespace

import pytest

from g4seg_core.commands.main import build_parser
from g4seg_core.commands.options import config_from_args
from g4seg_core.commands.segment import segmenter_config
from g4seg_core.config import KNOBS, G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.zeroshot import SEGMENTER_KNOBS, ZeroShotConfig
from nodes import NODE_CLASS_MAPPINGS

REFINE = ["refine", "i.png", "m.png", "--label", "cat", "--out", "o"]
SEGMENT = ["segment", "i.png", "--classes", "cat", "--out", "o"]
SETS = [("g4seg", knob) for knob in KNOBS] + [("segmenter", knob) for knob in SEGMENTER_KNOBS.knobs]


def _widget_specs():
    """{widget id: [(node id, (type or choices, options))]} of every node input."""
    out = {}
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        for section in ("required", "optional"):
            for name, spec in cls.INPUT_TYPES().get(section, {}).items():
                out.setdefault(name, []).append((node_id, spec))
    return out


SPECS = _widget_specs()
NODE_OF_SET = {"g4seg": None, "segmenter": "G4SegTextToMask"}


def _probe_values(knob):
    """min, max, one step outside each, non-finite values; every choice and one that is not."""
    if knob.kind == "choice":
        return list(knob.choices) + ["bogus"]
    if knob.kind not in ("int", "float", "band"):
        return []
    step = knob.step or (1 if knob.kind == "int" else 0.01)
    values = []
    for end, outside in ((knob.min, -step), (knob.max, step)):
        if end is not None:
            values += [end, end + outside]
    if knob.kind == "int":
        values = [int(v) for v in values]
    return values + [math.nan, math.inf, -math.inf, 1e40]


def _cli_accepts(which, knob, value):
    """The config the command line builds with the flag set to `value` (as typed), or None when refused."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if knob.kind == "band":
        argv = REFINE + [knob.cli_flag, text, f"{knob.default[1]:g}"]
    else:
        argv = (REFINE if which == "g4seg" else SEGMENT) + [knob.cli_flag, text]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(argv)
        return config_from_args(args) if which == "g4seg" else segmenter_config(args)
    except (SystemExit, G4SegError):
        return None


def _file_accepts(which, knob, value, tmp_path):
    """The config a JSON config file (G4Seg's --config; the segmenter's from_dict) builds, or None."""
    if knob.kind == "band":
        value = [value, knob.default[1]]
    if which == "segmenter":
        try:
            return ZeroShotConfig.from_dict({knob.name: value})
        except G4SegError:
            return None
    path = tmp_path / "config.json"
    path.write_text(json.dumps({knob.name: value}))  # Python's json writes NaN/Infinity, and reads them back
    try:
        return config_from_args(build_parser().parse_args(REFINE + ["--config", str(path)]))
    except G4SegError:
        return None


def _comfyui_accepts(spec, value):
    """ComfyUI's check of a widget value against its declaration: (accepted, the value as converted)."""
    kind, options = spec[0], spec[1]
    if isinstance(kind, list):
        return value in kind, value
    try:
        value = int(value) if kind == "INT" else float(value)
    except (ValueError, OverflowError):
        return False, value
    if ("min" in options and value < options["min"]) or ("max" in options and value > options["max"]):
        return False, value
    return True, value


def _node_accepts(which, knob, value):
    """The config each node with this knob's widget builds from `value`, or None when refused; None (no result)
    when no node has the widget."""
    widget = knob.widget_ids[0]
    specs = [(node, spec) for node, spec in SPECS.get(widget, [])
             if NODE_OF_SET[which] in (None, node) and (which == "segmenter" or node != "G4SegTextToMask")]
    if not specs:
        return "no widget"
    config_cls = G4SegConfig if which == "g4seg" else ZeroShotConfig
    results = set()
    for node, spec in specs:
        ok, converted = _comfyui_accepts(spec, value)
        config = None
        if ok:
            try:
                config = config_cls.from_widgets({widget: converted})
            except G4SegError:
                config = None
        results.add(None if config is None else json.dumps(config.to_dict()))
    assert len(results) == 1, f"nodes disagree on {widget}={value!r}: {specs}"
    result = results.pop()
    return None if result is None else config_cls.from_dict(json.loads(result))


@pytest.mark.parametrize("which, knob", SETS, ids=[f"{w}-{k.name}" for w, k in SETS])
def test_cli_config_file_and_node_accept_the_same_values(which, knob, tmp_path):
    values = _probe_values(knob)
    if not values:
        pytest.skip(f"{knob.name} is a {knob.kind} knob (checked by its own tests)")
    for value in values:
        cli = _cli_accepts(which, knob, value)
        from_file = _file_accepts(which, knob, value, tmp_path)
        node = _node_accepts(which, knob, value)
        got = {"cli": cli, "config file": from_file}
        if node != "no widget":
            got["node"] = node
        verdicts = {where: config is not None for where, config in got.items()}
        assert len(set(verdicts.values())) == 1, f"{knob.name}={value!r}: {verdicts}"
        accepted = [c for c in got.values() if c is not None]
        assert all(c == accepted[0] for c in accepted), f"{knob.name}={value!r}: {got}"
        finite = value if isinstance(value, str) else math.isfinite(value)
        in_range = isinstance(value, str) or ((knob.min is None or value >= knob.min)
                                              and (knob.max is None or value <= knob.max))
        if accepted:
            assert finite and in_range, f"{knob.name}={value!r} outside its range was accepted"
        elif isinstance(value, (int, float)) and finite and in_range and value in (knob.min, knob.max):
            # the ends are accepted unless a rule of the knob or of its set says why not
            knob_set = SEGMENTER_KNOBS if which == "segmenter" else G4SegConfig.knob_set
            full = (value, knob.default[1]) if knob.kind == "band" else value
            values = {**{k.name: k.default for k in knob_set.knobs}, knob.name: full}
            problems = [knob.rule(full) if knob.rule else None] + [rule(SimpleNamespace(**values))
                                                                   for rule in knob_set.rules]
            assert any(problems), f"{knob.name}={value!r} refused"


def test_every_numeric_knob_has_both_ends_and_every_widget_comes_from_a_knob():
    """Every number a user can give has a finite range; every segmenter widget of the node is a knob's."""
    for _, knob in SETS:
        if knob.kind in ("int", "float", "band"):
            assert knob.min is not None and knob.max is not None, knob.name
    text_to_mask = NODE_CLASS_MAPPINGS["G4SegTextToMask"].INPUT_TYPES()
    widgets = {**text_to_mask["required"], **text_to_mask.get("optional", {})}
    for knob in SEGMENTER_KNOBS.knobs:
        assert widgets[knob.name] == SEGMENTER_KNOBS.widget_inputs(knob.name)[knob.name]
