"""Command-line options shared by `g4seg refine` and `g4seg eval`: G4Seg parameters, model files.

Both g4seg_core/cli.py and g4seg_core/evaluation/cli.py import this module (neither imports
the other's caller), so there is no import circle between the two command modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import DIRECTIONS, EMI_MODES, EMI_SCHEDULES, SOFTEN_MODES, G4SegConfig
from .errors import G4SegError, ModelNotFoundError

RANDOM_BANNER = ("=" * 78 + "\n  RANDOM WEIGHTS: tiny random-weight models built from config.\n"
                 "  This checks the installation, not the result: the masks it writes are meaningless.\n"
                 "  Point at real weights with --checkpoint/--clip, G4SEG_CHECKPOINT/G4SEG_CLIP or a ComfyUI install.\n"
                 + "=" * 78)


# ---- parameters shared by refine and eval ------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    d = G4SegConfig()
    g = parser.add_argument_group("G4Seg parameters (defaults: the paper's; see README)")
    g.add_argument("--config", help="JSON file of G4SegConfig values; flags below override it")
    g.add_argument("--size", type=int, help=f"working resolution (default {d.size})")
    g.add_argument("--timestep", type=int, help=f"noise step t (default {d.timestep})")
    g.add_argument("--seed", type=int, help=f"noise seed (default {d.seed})")
    g.add_argument("--prompt-template", help=f"prompt with {{}} for the class (default {d.prompt_template!r})")
    g.add_argument("--emi-mode", choices=EMI_MODES, help=f"mask injection mode (default {d.emi_mode})")
    g.add_argument("--cross-weight", type=float, help=f"cross-attention injection weight (default {d.cross_weight})")
    g.add_argument("--self-weight", type=float, help=f"self-attention injection weight (default {d.self_weight})")
    g.add_argument("--emi-schedule", choices=EMI_SCHEDULES, help=f"weight schedule (default {d.emi_schedule})")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 1 = off)")
    g.add_argument("--grid", dest="correspondence_grid", type=int,
                   help=f"correspondence grid, 0 = CLIP's own (default {d.correspondence_grid})")
    g.add_argument("--direction", choices=DIRECTIONS, help=f"correspondence direction (default {d.direction})")
    g.add_argument("--beta", type=float, help=f"mixing coefficient (default {d.beta}; 0.9 for WSSS)")
    g.add_argument("--band", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help=f"coarse-filtering band (default {d.band[0]} {d.band[1]})")
    g.add_argument("--iterations", type=int, help=f"mixing iterations (default {d.iterations})")
    g.add_argument("--threshold", type=float, help=f"binary threshold (default {d.threshold})")
    g.add_argument("--soften", choices=SOFTEN_MODES, help=f"binary-mask softening (default {d.soften})")
    g.add_argument("--soften-width", type=float, help=f"softening width, working-size px (default {d.soften_width})")
    g.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="model dtype (default float32)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def config_from_args(args) -> G4SegConfig:
    values = {}
    if getattr(args, "config", None):
        try:
            values.update(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise G4SegError(f"cannot read --config {args.config}: {exc}") from exc
    for name in G4SegConfig.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return G4SegConfig.from_dict(values)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models (never downloaded)")
    g.add_argument("--checkpoint", help="SD checkpoint: single .safetensors/.ckpt or a diffusers folder "
                                        "(else $G4SEG_CHECKPOINT, else ComfyUI models/checkpoints)")
    g.add_argument("--clip", help="CLIP image encoder: a models/clip_vision file, open_clip weights, or "
                                  "'ViT-B-16:/path/weights.bin' (else $G4SEG_CLIP, else ComfyUI models/clip_vision)")
    g.add_argument("--comfyui-dir", help="a ComfyUI install whose models/ folders are searched (else $COMFYUI_PATH)")
    g.add_argument("--family", choices=("sd15", "sd21", "sd21v", "sdxl"),
                   help="model family when it cannot be read from the file (SD2.1-768 v-prediction: sd21v)")
    g.add_argument("--selfcheck", action="store_true",
                   help="use tiny random-weight models: checks the installation, not the result")
    g.add_argument("--selfcheck-if-missing", action="store_true",
                   help="use real weights when found, else the tiny random-weight self-check (said loudly)")


def build_pipeline(args, config: G4SegConfig):
    from .pipeline import G4SegPipeline

    if args.selfcheck:
        print(RANDOM_BANNER, file=sys.stderr)
        return G4SegPipeline.tiny(device=args.device or "cpu"), "selfcheck (random weights)"
    try:
        pipe = G4SegPipeline.from_pretrained(args.checkpoint, clip=args.clip, comfyui_dir=args.comfyui_dir,
                                             family=args.family, device=args.device, dtype=config.dtype)
        files = ", ".join(str(f) for f in pipe.components.files)
        print(f"g4seg: SD weights {files}; CLIP {getattr(pipe.clip, 'name', 'clip')}", file=sys.stderr)
        return pipe, "weights: " + files
    except ModelNotFoundError as exc:
        if not args.selfcheck_if_missing:
            raise
        print(f"no weights found:\n{exc}\n", file=sys.stderr)
        print(RANDOM_BANNER, file=sys.stderr)
        return G4SegPipeline.tiny(device=args.device or "cpu"), "selfcheck (random weights; no weights found)"
