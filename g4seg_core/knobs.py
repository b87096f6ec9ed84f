"""Knobs declared once: a `KnobSet` of `Knob`s generates a config dataclass (fields, defaults and
validation), its command-line flags and its ComfyUI widget declarations, so a config file, the CLI
and a node accept exactly the same values.

Two knob sets use it: G4Seg's (config.KNOBS -> G4SegConfig) and the segmenter's
(zeroshot/config.SEGMENTER_KNOBS -> ZeroShotConfig). Every number is checked finite and in its
range; a knob's help says why its range ends where it does when going further would break the
computation. No ComfyUI import: the widget declarations are plain (type, options) tuples.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from .errors import G4SegError

_WIDGET_TYPES = {"int": "INT", "float": "FLOAT", "str": "STRING", "band": "FLOAT"}


@dataclass(frozen=True)
class Knob:
    """One parameter. `kind`: "int", "float", "str", "choice", "band" (low, high) or "optional_str"."""

    name: str
    kind: str
    default: Any
    help: str
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None  # widget step in the node
    choices: Tuple[str, ...] = ()
    rule: Optional[Callable[[Any], Optional[str]]] = None  # extra check: the fix to name, or None
    flag: Optional[str] = None  # CLI flag; default --name-with-dashes; "" = no CLI flag
    widget: Optional[str] = None  # node widget id; default the name ("band": band_low, band_high)
    widget_extra: Tuple[Tuple[str, Any], ...] = ()  # node-only widget options

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-") if self.flag is None else self.flag

    @property
    def widget_ids(self) -> Tuple[str, ...]:
        if self.kind == "band":
            return (f"{self.widget or self.name}_low", f"{self.widget or self.name}_high")
        return (self.widget or self.name,)

    def range_text(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}..{self.max:g}"
        return f">= {self.min:g}" if self.min is not None else ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or type(v).__name__ in (
        "float32", "float64", "int32", "int64")  # numpy scalars from a computed sweep


def check_knob(knob: Knob, value):
    """The value in its canonical type (ints as ints, floats as floats, band as a tuple), else G4SegError."""
    name = knob.name

    def fail(fix: str):
        raise G4SegError(f"{name}={value!r}: {fix}")

    in_range = f" in {knob.range_text()}" if knob.range_text() else ""
    if knob.kind == "int":
        if not _is_int(value):
            if _is_number(value) and float(value).is_integer() and not isinstance(value, float):
                value = int(value)
            else:
                fail(f"use a whole number{in_range} (got {type(value).__name__})")
    elif knob.kind == "float":
        if not _is_number(value):
            fail(f"use a number{in_range} (got {type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            fail(f"use a finite number{in_range}")
    elif knob.kind == "band":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            fail("use two numbers [low, high] with 0 <= low <= high <= 1, e.g. [0.2, 0.6]")
        value = tuple(float(v) for v in value)
        if not all(math.isfinite(v) for v in value):
            fail(f"use finite numbers{in_range}")
    elif knob.kind in ("str", "choice"):
        if not isinstance(value, str):
            fail(f"use a string (got {type(value).__name__})"
                 + (f": one of {', '.join(knob.choices)}" if knob.choices else ""))
        if knob.kind == "choice" and value not in knob.choices:
            fail(f"choose one of {', '.join(knob.choices)}")
    elif knob.kind == "optional_str":
        if value is not None and not isinstance(value, str):
            fail(f"use a string or null (got {type(value).__name__})")
    values = value if knob.kind == "band" else (value,)
    if knob.kind in ("int", "float", "band"):
        low_ok = knob.min is None or all(v >= knob.min for v in values)
        high_ok = knob.max is None or all(v <= knob.max for v in values)
        if not (low_ok and high_ok):
            fail(f"use {knob.range_text()}" + (f" ({knob.help})" if knob.kind == "band" else ""))
    if knob.rule is not None:
        problem = knob.rule(value)
        if problem:
            fail(problem)
    return value


class KnobSet:
    """Knobs of one configurable thing, plus rules that tie several of them (each: config -> the fix, or None).

    `what` names a knob of the set in messages ("G4Seg parameter", "segmenter setting").
    """

    def __init__(self, what: str, knobs: Sequence[Knob], rules: Sequence[Callable[[Any], Optional[str]]] = ()):
        self.what = what
        self.knobs: Tuple[Knob, ...] = tuple(knobs)
        self.rules = tuple(rules)
        self.by_name: Dict[str, Knob] = {k.name: k for k in self.knobs}
        self.by_widget: Dict[str, Knob] = {w: k for k in self.knobs for w in k.widget_ids}

    # ---- the dataclass
    def make_config(self, name: str, module: str, doc: str, methods: type = object) -> type:
        """A dataclass with one field per knob (default: the knob's), validated on creation.

        `methods`: a class with extra methods for it (KnobConfig's are always there)."""
        bases = (methods, KnobConfig) if methods is not object else (KnobConfig,)
        cls = dataclasses.make_dataclass(
            name, [(k.name, Any, dataclasses.field(default=k.default)) for k in self.knobs], bases=bases)
        cls.knob_set = self
        cls.__module__ = module
        cls.__doc__ = doc
        return cls

    # ---- command-line flags
    def add_arguments(self, group, dest_prefix: str = "", skip: Sequence[str] = ()) -> None:
        """One flag per knob (default None: a flag overrides a config file only when given); argparse converts
        the text, `values_from_args` + the config check the value like any other source."""
        for knob in self.knobs:
            if not knob.cli_flag or knob.name in skip:
                continue
            if knob.kind == "band":
                default = " ".join(f"{v:g}" for v in knob.default)
            else:
                default = repr(knob.default) if knob.kind == "str" else knob.default
            shown = f"{knob.help} (default {default})" if knob.default is not None else knob.help
            kwargs = {"dest": dest_prefix + knob.name, "help": shown.replace("%", "%%")}
            if knob.kind == "choice":
                kwargs["choices"] = knob.choices
            elif knob.kind in ("int", "float"):
                kwargs.update(type=int if knob.kind == "int" else float, metavar=knob.name.upper())
            elif knob.kind == "band":
                kwargs.update(type=float, nargs=2, metavar=("LOW", "HIGH"))
            group.add_argument(knob.cli_flag, **kwargs)

    def values_from_args(self, args, dest_prefix: str = "") -> Dict[str, Any]:
        """{knob: value} of the flags given."""
        values = {}
        for knob in self.knobs:
            value = getattr(args, dest_prefix + knob.name, None)
            if value is not None:
                values[knob.name] = value
        return values

    def given_flags(self, args, dest_prefix: str = "", skip: Sequence[str] = ()) -> list:
        return [k.cli_flag for k in self.knobs if k.cli_flag and k.name not in skip
                and getattr(args, dest_prefix + k.name, None) is not None]

    # ---- node widgets
    def widget_inputs(self, *widget_ids: str, defaults: Optional[dict] = None,
                      tooltips: Optional[dict] = None) -> dict:
        """ComfyUI widget declarations {id: (type or choices, options)} of these knobs, in the order given.

        Type, default, range, step and tooltip come from the knob; a node may give another default or
        tooltip where the knob means something node-specific there."""
        out = {}
        for widget in widget_ids:
            knob = self.by_widget[widget]
            if knob.kind == "band":
                end = knob.widget_ids.index(widget)
                default, tooltip = knob.default[end], ("Lower" if end == 0 else "Upper") + " end. " + knob.help
            else:
                default, tooltip = knob.default, knob.help
            options = {"default": default}
            if knob.kind in ("int", "float", "band"):
                options.update({k: v for k, v in (("min", knob.min), ("max", knob.max), ("step", knob.step))
                                if v is not None})
            options.update(dict(knob.widget_extra))
            options["tooltip"] = (tooltips or {}).get(widget, tooltip)
            if defaults and widget in defaults:
                options["default"] = defaults[widget]
            kind = list(knob.choices) if knob.kind == "choice" else _WIDGET_TYPES[knob.kind]
            out[widget] = (kind, options)
        return out


class KnobConfig:
    """Methods of every generated config (`knob_set` is set by KnobSet.make_config)."""

    knob_set: KnobSet

    def __post_init__(self) -> None:
        self.validate()

    def validate(self):
        """Check every value against its knob (type, finite, range, rule) and the set's rules; values are
        normalised in place."""
        for knob in self.knob_set.knobs:
            object.__setattr__(self, knob.name, check_knob(knob, getattr(self, knob.name)))
        for rule in self.knob_set.rules:
            problem = rule(self)
            if problem:
                raise G4SegError(problem)
        return self

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k.name: list(getattr(self, k.name)) if k.kind == "band" else getattr(self, k.name)
                for k in self.knob_set.knobs}

    @classmethod
    def from_dict(cls, values: dict):
        known = cls.knob_set.by_name
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise G4SegError(f"unknown {cls.knob_set.what}(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_widgets(cls, widgets: dict):
        """A config from node widget values (the widget ids of the knobs); widgets a node does not have keep
        their defaults; anything that is not a knob widget is an error."""
        values: Dict[str, Any] = {}
        for widget, value in widgets.items():
            knob = cls.knob_set.by_widget.get(widget)
            if knob is None:
                raise G4SegError(f"{widget!r} is not a {cls.knob_set.what} widget")
            if knob.kind == "band":
                band = list(values.get(knob.name, knob.default))
                band[knob.widget_ids.index(widget)] = value
                values[knob.name] = tuple(band)
            else:
                values[knob.name] = value
        return cls(**values)


def check_finite(values, stage: str, knobs: Dict[str, Any], fix: str = "") -> None:
    """A G4SegError naming the stage and the knobs it depends on when `values` (a tensor or array) hold NaN or
    infinity: the knobs' ranges keep the arithmetic finite, so what is left is the models' precision or a knob at
    an extreme of its range."""
    import torch

    tensor = values if torch.is_tensor(values) else torch.as_tensor(values)
    if bool(torch.isfinite(tensor).all()):
        return
    settings = ", ".join(f"{name}={value!r}" for name, value in knobs.items())
    fix = fix or "move these knobs towards their defaults"
    raise G4SegError(f"{stage} gave NaN or infinite values (with {settings}): {fix}")
