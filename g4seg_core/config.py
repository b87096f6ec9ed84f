"""Every parameter of the method (SPEC.md), with the paper's defaults.

Values marked "reconstruction" are choices the paper leaves open; README.md lists them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import G4SegError

EMI_MODES = ("additive", "densediffusion", "off")
EMI_SCHEDULES = ("constant", "t5")
DIRECTIONS = ("original_to_generated", "generated_to_original")
SOFTEN_MODES = ("sdf", "blur", "none")
# "auto": bfloat16 on CPUs with native bf16, float16 on CUDA, float32 elsewhere (precision.py)
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")


def fill_prompt(template: str, label: str) -> str:
    """The template with every '{}' replaced by the class name (other braces kept as typed)."""
    if "{}" not in template:
        raise G4SegError(f"prompt_template {template!r} has no '{{}}' where the class name goes, "
                         "e.g. 'a photo of a {}'")
    return template.replace("{}", label)


@dataclass
class G4SegConfig:
    # Step 1: working resolution (paper: 512; SD2.1-768 v-models: 768; SDXL: 1024).
    size: int = 512
    # Step 3: noise level (paper: 400, Fig. 4 sweeps 100..700).
    timestep: int = 400
    seed: int = 0
    # Step 4: explicit mask injection.
    prompt_template: str = "a photo of a {}"
    emi_mode: str = "densediffusion"  # "additive" (Eq. 5), "densediffusion", "off"
    # additive: weight `a` of Eq. 5, added to QK^T before the 1/sqrt(d) scale.
    # densediffusion: the modulation strength w (DenseDiffusion defaults 1.0 / 0.3).
    cross_weight: float = 1.0
    self_weight: float = 0.3
    area_scale: float = 1.0  # DenseDiffusion's s in (1 - s*area)
    emi_schedule: str = "constant"  # "t5" multiplies weights by (t/1000)^5
    # Step 5: CFG is off by default (one conditional pass).
    cfg_scale: float = 1.0
    negative_prompt: str = ""
    # Steps 6-9: correspondence and mixing.
    correspondence_grid: int = 64  # features resampled to this grid (<= 128); 0 = native
    direction: str = "original_to_generated"
    beta: float = 0.8  # 0.8 open-vocabulary, 0.9 weakly supervised
    band: Tuple[float, float] = (0.2, 0.6)  # coarse filtering: update only low<=S<=high
    iterations: int = 1
    threshold: float = 0.5
    # Step 10: binary inputs are softened first (reconstruction).
    soften: str = "sdf"  # sigmoid of the signed distance; "blur"; "none"
    soften_width: float = 8.0  # pixels at the working size
    # Multi-class fusion: bg = (1 - max_c S_c) ** bg_power.
    bg_power: float = 1.0
    # Engine.
    dtype: str = "auto"  # one of DTYPE_CHOICES; precision.resolve_dtype says what auto picks
    device: Optional[str] = None  # None: cuda if available, else cpu

    def __post_init__(self) -> None:
        self.band = tuple(float(b) for b in self.band)  # JSON gives lists
        self.validate()

    def validate(self) -> "G4SegConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise G4SegError(msg)

        need(self.size % 64 == 0 and 64 <= self.size <= 2048,
             f"size={self.size}: use a multiple of 64 between 64 and 2048 (512 for SD1.5/2.1, 768 for SD2.1-v, 1024 for SDXL)")
        need(1 <= self.timestep <= 999, f"timestep={self.timestep}: use 1..999 (paper default 400)")
        need("{}" in self.prompt_template,
             f"prompt_template={self.prompt_template!r} has no '{{}}' for the class name, e.g. 'a photo of a {{}}'")
        need(self.emi_mode in EMI_MODES, f"emi_mode={self.emi_mode!r}: choose one of {EMI_MODES}")
        need(self.emi_schedule in EMI_SCHEDULES, f"emi_schedule={self.emi_schedule!r}: choose one of {EMI_SCHEDULES}")
        for name in ("cross_weight", "self_weight", "area_scale", "cfg_scale", "soften_width"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                 f"{name}={value!r}: use a finite number >= 0")
        need(self.correspondence_grid == 0 or 8 <= self.correspondence_grid <= 128,
             f"correspondence_grid={self.correspondence_grid}: use 0 (the feature grid) or 8..128")
        need(self.direction in DIRECTIONS, f"direction={self.direction!r}: choose one of {DIRECTIONS}")
        need(0.0 <= self.beta <= 1.0, f"beta={self.beta}: use 0..1 (paper: 0.8 open-vocabulary, 0.9 WSSS)")
        need(len(self.band) == 2 and 0.0 <= self.band[0] <= self.band[1] <= 1.0,
             f"band={self.band}: use (low, high) with 0 <= low <= high <= 1, e.g. (0.2, 0.6)")
        need(isinstance(self.iterations, int) and self.iterations >= 1,
             f"iterations={self.iterations}: use an integer >= 1")
        need(0.0 < self.threshold < 1.0, f"threshold={self.threshold}: use a value strictly between 0 and 1")
        need(self.soften in SOFTEN_MODES, f"soften={self.soften!r}: choose one of {SOFTEN_MODES}")
        need(self.bg_power > 0, f"bg_power={self.bg_power}: use a number > 0")
        need(self.dtype in DTYPE_CHOICES, f"dtype={self.dtype!r}: choose one of {DTYPE_CHOICES}")
        return self

    def prompt_for(self, label: str) -> str:
        return fill_prompt(self.prompt_template, label)

    def replace(self, **changes) -> "G4SegConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["band"] = list(self.band)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "G4SegConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise G4SegError(f"unknown G4Seg parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def emi_time_factor(schedule: str, timestep: float) -> float:
    """DenseDiffusion scales its modulation by (t/1000)^5; 'constant' keeps it at 1."""
    if schedule == "t5":
        return (float(timestep) / 1000.0) ** 5
    return 1.0
