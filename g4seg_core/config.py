"""Every parameter of the method (SPEC.md), declared once in KNOBS, with the paper's defaults.

KNOBS is the single declaration of each knob: name, type, default, range, help text. Through
knobs.KnobSet it generates G4SegConfig (fields and validation, including the type checks of values
read from a JSON file), the CLI flags (commands/options.py) and the ComfyUI node widgets
(nodes/common.py: knob_inputs, same widget ids, order and defaults as the nodes always had).

Values marked "reconstruction" are choices the paper leaves open; README.md lists them.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from .errors import G4SegError
from .knobs import Knob, KnobSet, check_knob  # noqa: F401  (check_knob: part of this module's API)

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
    Knob("bg_power", "float", 1.0, "Background channel (1 - max S)^p in the multi-class fusion; p > 0 (0 would make "
         "the background 1 everywhere, 0^0 included), at most 100 (beyond, the background is already ~0 wherever "
         "a class has any probability).", min=0.0, max=100.0, rule=_positive_rule),
    # Engine.
    Knob("dtype", "choice", "auto", "Model dtype; auto: bfloat16 on CPUs where it is fast (AMX, AMD AVX512-BF16), "
         "float16 on CUDA, else float32.", choices=DTYPE_CHOICES),
    Knob("device", "optional_str", None, "cpu, cuda, cuda:1 ... (default: cuda if available); checked to exist "
         "before any model loads (loading.precision.check_device, by the commands).")
)
KNOB_SET = KnobSet("G4Seg parameter", KNOBS)
KNOB_BY_NAME: Dict[str, Knob] = KNOB_SET.by_name
KNOB_BY_WIDGET: Dict[str, Knob] = KNOB_SET.by_widget


class _G4SegMethods:
    def prompt_for(self, label: str) -> str:
        return fill_prompt(self.prompt_template, label)


G4SegConfig = KNOB_SET.make_config(
    "G4SegConfig", __name__, "Every knob of KNOBS as a field (validated on creation; see KNOBS for the meaning).",
    _G4SegMethods)


def emi_time_factor(schedule: str, timestep: float) -> float:
    """DenseDiffusion scales its modulation by (t/1000)^5; 'constant' keeps it at 1."""
    if schedule == "t5":
        return (float(timestep) / 1000.0) ** 5
    return 1.0
