"""Every parameter of the method (SPEC.md), declared once in KNOBS, with the paper's defaults.

KNOBS is the single declaration of each knob: name, type, default, range, help text. It
generates G4SegConfig (fields and validation, including the type checks of values read from
a JSON file), the CLI flags (cli_options.py) and the ComfyUI node widgets (nodes/common.py:
knob_inputs, same widget ids, order and defaults as the nodes always had).

Values marked "reconstruction" are choices the paper leaves open; README.md lists them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from .errors import G4SegError

EMI_MODES = ("additive", "densediffusion", "off")
EMI_SCHEDULES = ("constant", "t5")
DIRECTIONS = ("original_to_generated", "generated_to_original")
SOFTEN_MODES = ("sdf", "blur", "none")
# Dense CLIP features for the correspondence: the CLIP's own last block, or NACLIP's (zeroshot.neighbourhood)
CLIP_FEATURE_MODES = ("last_layer", "naclip")
# "auto": bfloat16 on CPUs with native bf16, float16 on CUDA, float32 elsewhere (precision.py)
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def fill_prompt(template: str, label: str) -> str:
    """The template with every '{}' replaced by the class name (other braces kept as typed)."""
    if "{}" not in template:
        raise G4SegError(f"prompt_template {template!r} has no '{{}}' where the class name goes, "
                         "e.g. 'a photo of a {}'")
    return template.replace("{}", label)


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


def _size_rule(v: int) -> Optional[str]:
    if v != 0 and v % 64:
        return "use 0 (keep the image size) or a multiple of 64 (512 SD1.5/2.1, 768 SD2.1-v, 1024 SDXL)"
    return None


def _grid_rule(v: int) -> Optional[str]:
    return "use 0 (the CLIP patch grid) or 8..128" if 0 < v < 8 else None


def _template_rule(v: str) -> Optional[str]:
    return None if "{}" in v else "put '{}' where the class name goes, e.g. 'a photo of a {}'"


def _band_rule(v: Tuple[float, float]) -> Optional[str]:
    return None if v[0] <= v[1] else "use low <= high, e.g. 0.2 0.6 (paper)"


def _positive_rule(v: float) -> Optional[str]:
    return None if v > 0 else "use a number > 0"


KNOBS: Tuple[Knob, ...] = (
    # Step 1: working resolution.
    Knob("size", "int", 512, "Working size: size x size (paper: 512; SD2-768-v: 768; SDXL: 1024); 0 keeps the "
         "image size (rounded down to a multiple of 8).", min=0, max=2048, step=64, rule=_size_rule),
    # Step 3: noise level (Fig. 4 sweeps 100..700).
    Knob("timestep", "int", 400, "Noise level t the image is noised to (paper: 400).", min=1, max=999),
    Knob("seed", "int", 0, "Noise seed; image i of a batch uses seed + i.", min=0, max=0xffffffffffffffff,
         widget_extra=(("control_after_generate", True),)),
    # Step 4: explicit mask injection.
    Knob("prompt_template", "str", "a photo of a {}", "Prompt with '{}' where the class name goes; literal text (no (word:1.2) weighting).",
         rule=_template_rule),
    Knob("emi_mode", "choice", "densediffusion", "Mask injection: densediffusion (DenseDiffusion's modulation, "
         "which the paper follows), additive (Eq. 5 bias) or off.", choices=EMI_MODES),
    Knob("cross_weight", "float", 1.0, "Cross-attention strength (additive: a of Eq. 5, before 1/sqrt(d); "
         "densediffusion: w, default 1.0).", min=0.0, max=20.0, step=0.05),
    Knob("self_weight", "float", 0.3, "Self-attention strength, same scale as cross_weight (DenseDiffusion: 0.3).",
         min=0.0, max=20.0, step=0.05),
    Knob("area_scale", "float", 1.0, "densediffusion only: s in (1 - s*area), weakening the push for large masks.",
         min=0.0, max=10.0, step=0.05),
    Knob("emi_schedule", "choice", "constant", "Injection strength over t: constant, or DenseDiffusion's "
         "(t/1000)^5 (almost off at t=400).", choices=EMI_SCHEDULES, widget="schedule"),
    # Step 5: CFG is off by default (one conditional pass).
    Knob("cfg_scale", "float", 1.0, "Classifier-free guidance scale; 1 = one conditional pass (paper).",
         min=0.0, max=30.0, step=0.1, widget="cfg"),
    Knob("negative_prompt", "str", "", "Negative prompt (literal text), used only when the CFG scale is not 1."),
    # Steps 6-9: correspondence and mixing.
    Knob("correspondence_grid", "int", 64, "Features are resampled to grid x grid before matching (0 = the CLIP "
         "patch grid; at most 128).", min=0, max=128, step=8, rule=_grid_rule, flag="--grid", widget="grid"),
    Knob("direction", "choice", "original_to_generated", "Correspondence direction: original_to_generated (for each "
         "original location, where its content went; default) or generated_to_original (Eq. 8 read literally).",
         choices=DIRECTIONS),
    Knob("clip_features", "choice", "last_layer", "Dense CLIP features for the correspondence: last_layer (the "
         "CLIP's own last block, as the paper) or naclip (NACLIP's last block: keys against keys plus a Gaussian "
         "neighbourhood, no residual/MLP; patch tokens localise better; not yet measured for G4Seg).",
         choices=CLIP_FEATURE_MODES),
    Knob("beta", "float", 0.8, "Weight of the original probability in the mix (paper: 0.8 open-vocabulary, "
         "0.9 weakly supervised).", min=0.0, max=1.0, step=0.01),
    Knob("band", "band", (0.2, 0.6), "Coarse filtering: only pixels with low <= S <= high are updated "
         "(paper: 0.2, 0.6).", min=0.0, max=1.0, step=0.01, rule=_band_rule),
    Knob("iterations", "int", 1, "How many times the mixing is repeated with the updated map.", min=1, max=20),
    Knob("threshold", "float", 0.5, "Threshold of the binary output.", min=0.01, max=0.99, step=0.01),
    # Step 10 (reconstruction): binary inputs are softened first.
    Knob("soften", "choice", "sdf", "How a binary mask becomes a probability map: sdf (sigmoid of the signed "
         "distance), blur, or none; soft masks are used as they are.", choices=SOFTEN_MODES),
    Knob("soften_width", "float", 8.0, "Softening width in pixels of the working size (scaled to the mask's "
         "resolution).", min=0.5, max=256.0, step=0.5),
    # Multi-class fusion: bg = (1 - max_c S_c) ** bg_power.
    Knob("bg_power", "float", 1.0, "Background channel (1 - max S)^p in the multi-class fusion.", min=0.0,
         rule=_positive_rule),
    # Engine.
    Knob("dtype", "choice", "auto", "Model dtype; auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on CUDA, "
         "else float32.", choices=DTYPE_CHOICES),
    Knob("device", "optional_str", None, "cpu, cuda, cuda:1 ... (default: cuda if available)."),
)
KNOB_BY_NAME: Dict[str, Knob] = {k.name: k for k in KNOBS}
KNOB_BY_WIDGET: Dict[str, Knob] = {w: k for k in KNOBS for w in k.widget_ids}


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

    if knob.kind == "int":
        if not _is_int(value):
            if _is_number(value) and float(value).is_integer() and not isinstance(value, float):
                value = int(value)
            else:
                fail(f"use a whole number{' in ' + knob.range_text() if knob.range_text() else ''} "
                     f"(got {type(value).__name__})")
    elif knob.kind == "float":
        if not _is_number(value):
            fail(f"use a number{' in ' + knob.range_text() if knob.range_text() else ''} (got {type(value).__name__})")
        value = float(value)
        if not math.isfinite(value):
            fail("use a finite number")
    elif knob.kind == "band":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            fail("use two numbers [low, high] with 0 <= low <= high <= 1, e.g. [0.2, 0.6]")
        value = tuple(float(v) for v in value)
        if not all(math.isfinite(v) for v in value):
            fail("use finite numbers")
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


class _ConfigMethods:
    def __post_init__(self) -> None:
        self.validate()

    def validate(self):
        """Check every value against its knob (type, range, rule); values are normalised in place."""
        for knob in KNOBS:
            object.__setattr__(self, knob.name, check_knob(knob, getattr(self, knob.name)))
        return self

    def prompt_for(self, label: str) -> str:
        return fill_prompt(self.prompt_template, label)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["band"] = list(self.band)
        return out

    @classmethod
    def from_dict(cls, values: dict):
        unknown = sorted(set(values) - set(KNOB_BY_NAME))
        if unknown:
            raise G4SegError(f"unknown G4Seg parameter(s) {unknown}; known: {sorted(KNOB_BY_NAME)}")
        return cls(**values)

    @classmethod
    def from_widgets(cls, widgets: dict):
        """A config from node widget values (ids as in the nodes: grid, schedule, cfg, band_low/band_high ...).

        Widgets a node does not have keep their defaults; anything that is not a knob widget is an error.
        """
        values: Dict[str, Any] = {}
        band = list(KNOB_BY_NAME["band"].default)
        for widget, value in widgets.items():
            knob = KNOB_BY_WIDGET.get(widget)
            if knob is None:
                raise G4SegError(f"{widget!r} is not a G4Seg parameter widget")
            if knob.kind == "band":
                band[knob.widget_ids.index(widget)] = value
                values["band"] = tuple(band)
            else:
                values[knob.name] = value
        return cls(**values)


G4SegConfig = dataclasses.make_dataclass(
    "G4SegConfig", [(k.name, Any, dataclasses.field(default=k.default)) for k in KNOBS], bases=(_ConfigMethods,))
G4SegConfig.__module__ = __name__
G4SegConfig.__doc__ = "Every knob of KNOBS as a field (validated on creation; see KNOBS for the meaning)."


def emi_time_factor(schedule: str, timestep: float) -> float:
    """DenseDiffusion scales its modulation by (t/1000)^5; 'constant' keeps it at 1."""
    if schedule == "t5":
        return (float(timestep) / 1000.0) ** 5
    return 1.0
