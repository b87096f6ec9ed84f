"""Command-line options shared by `g4seg refine` and `g4seg eval`: G4Seg parameters, model files.

Both g4seg_core/commands/main.py and g4seg_core/commands/evaluate.py import this module (neither imports
the other's caller), so there is no import circle between the two command modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import KNOB_SET, G4SegConfig
from ..errors import G4SegError, ModelNotFoundError
from ..loading.precision import check_device

RANDOM_BANNER = ("=" * 78 + "\n  RANDOM WEIGHTS: tiny random-weight models built from config.\n"
                 "  This checks the installation, not the result: the masks it writes are meaningless.\n"
                 "  Point at real weights with --checkpoint/--clip, G4SEG_CHECKPOINT/G4SEG_CLIP or a ComfyUI install.\n"
                 + "=" * 78)


# ---- parameters shared by refine and eval ------------------------------------------------
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per knob of config.KNOBS (default None: a flag overrides --config only when given)."""
    g = parser.add_argument_group("G4Seg parameters (defaults: the paper's; see README)")
    g.add_argument("--config", help="JSON file of G4SegConfig values; flags below override it")
    KNOB_SET.add_arguments(g)


def _no_duplicate_keys(pairs) -> dict:
    """A JSON object; a key given twice is an error (json keeps the last one silently)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} given more than once: keep one")
    return dict(pairs)


def config_from_args(args) -> G4SegConfig:
    values = {}
    if getattr(args, "config", None):
        try:
            loaded = json.loads(Path(args.config).read_text(), object_pairs_hook=_no_duplicate_keys)
        except (OSError, json.JSONDecodeError, ValueError) as exc:
            raise G4SegError(f"cannot read --config {args.config}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise G4SegError(f"--config {args.config} holds a JSON {type(loaded).__name__}; it must be an object of "
                             "G4Seg parameters, e.g. {\"beta\": 0.9}")
        values.update(loaded)
    values.update(KNOB_SET.values_from_args(args))
    try:
        config = G4SegConfig.from_dict(values)
    except G4SegError as exc:
        where = f" (flags and --config {args.config})" if getattr(args, "config", None) else ""
        raise G4SegError(f"{exc}{where}") from None
    if config.device:
        check_device(config.device)  # before any model loads: one line naming the devices there are
    return config


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models (never downloaded)")
    g.add_argument("--checkpoint", help="SD checkpoint: single .safetensors/.ckpt or a diffusers folder "
                                        "(else $G4SEG_CHECKPOINT, else ComfyUI models/checkpoints)")
    g.add_argument("--clip", help="CLIP image encoder: a models/clip_vision file, open_clip weights, or "
                                  "'ViT-B-16:/path/weights.bin' (else $G4SEG_CLIP, else ComfyUI models/clip_vision)")
    g.add_argument("--comfyui-dir", help="a ComfyUI install whose models/ folders are searched (else $COMFYUI_PATH)")
    g.add_argument("--family", choices=("sd15", "sd21", "sd21v", "sdxl"),
                   help="model family when it cannot be read from the file (SD2.1-768 v-prediction: sd21v); with "
                        "--selfcheck, the family of the tiny models (default sd21)")
    g.add_argument("--selfcheck", action="store_true",
                   help="use tiny random-weight models: checks the installation, not the result")
    g.add_argument("--selfcheck-if-missing", action="store_true",
                   help="use real weights when found, else the tiny random-weight self-check (said loudly)")


def check_given_model_paths(args) -> None:
    """A model path the user named (--checkpoint, --clip, --text, or $G4SEG_CHECKPOINT / $G4SEG_CLIP when the
    flag is absent) that does not exist is an error naming it, before any work, whatever
    --selfcheck-if-missing says (it stands in only for models nobody named)."""
    import os

    from ..loading.clip_loading import split_clip_spec
    from ..loading.model_files import CHECKPOINT_ENV, CLIP_ENV

    if getattr(args, "selfcheck", False):
        return
    named = [("--checkpoint", args.checkpoint, CHECKPOINT_ENV), ("--clip", args.clip, CLIP_ENV),
             ("--text", getattr(args, "text", None), None)]
    for flag, value, env in named:
        origin = flag
        if not value and env and os.environ.get(env):
            value, origin = os.environ[env], f"${env}"
        if not value:
            continue
        path = Path(os.path.expanduser(split_clip_spec(value)[1] if flag != "--checkpoint" else str(value)))
        if not path.exists():
            raise G4SegError(f"{origin} {path} does not exist: check the path (a model you name is never replaced "
                             "by another or by random weights)")


def refuse_selfcheck_for_named_models(args, exc: ModelNotFoundError) -> None:
    """--selfcheck-if-missing stands in for models nobody named, never for a named one's missing partner."""
    named = [flag for flag, dest in (("--checkpoint", "checkpoint"), ("--clip", "clip"), ("--text", "text"))
             if getattr(args, dest, None)]
    if named:
        raise G4SegError(f"{exc}\n--selfcheck-if-missing does not replace models next to named ones "
                         f"({', '.join(named)}): name the missing one too, or none") from None


def _file_stamp(value) -> dict:
    """A model file (or diffusers folder) as path, size and modification time: enough to tell another file."""
    import os

    from ..loading.clip_loading import split_clip_spec

    name, file = split_clip_spec(value)
    path = Path(os.path.expanduser(file)).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]
    stamp = {"path": str(path), "bytes": sum(st.st_size for st in stats),
             "mtime_ns": max((st.st_mtime_ns for st in stats), default=0), "files": len(files)}
    if name:
        stamp["architecture"] = name
    return stamp


def inputs_key(*paths) -> list:
    """Each input file's size and modification time (for --skip-existing): a photo or mask replaced under the
    same name is another input, whose earlier outputs are not its own."""
    stats = [Path(p).stat() for p in paths]
    return [{"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns} for p, st in zip(paths, stats)]


def models_key(args, dtype, sd: bool = True, clip: bool = True, text: bool = False,
               clip_for_text: bool = False) -> dict:
    """What identifies the models a run would load, found without loading them (for --skip-existing): the
    self-check, or each model file's path, size and modification time; and the device kind and the dtype it
    resolves to (--dtype auto and the dtype auto picks are the same run).
    sd: the SD checkpoint is needed (else recorded when found); text: --text counts; clip_for_text: the CLIP
    image encoder is searched for the text tower's width (g4seg segment), so the file each width would pick
    is recorded too where it differs from the plain pick."""
    import os

    from ..loading.model_files import CLIP_ENV, CLIP_SEARCH_WIDTHS, find_checkpoint, find_clip_vision
    from ..loading.precision import default_device, dtype_key

    def key(device: str) -> dict:
        return {"device": device.split(":")[0], "dtype": dtype_key(dtype, device, getattr(args, "family", None))}

    selfcheck = {"models": "selfcheck (random weights)"}
    if sd:  # the tiny SD models are built for --family (build_pipeline): another family is another result
        selfcheck["family"] = selfcheck_family(args)
    if args.selfcheck:  # the tiny models run where build_pipeline puts them: --device, else the CPU
        return {**key(args.device or "cpu"), **selfcheck}
    files = {}
    try:
        try:  # the order the models load in: the SD checkpoint first
            files["checkpoint"] = find_checkpoint(args.checkpoint, args.comfyui_dir)
        except ModelNotFoundError:
            if sd:
                raise
        if clip:
            files["clip"] = find_clip_vision(args.clip, args.comfyui_dir)
            if clip_for_text and not args.clip and not os.environ.get(CLIP_ENV):
                for width in CLIP_SEARCH_WIDTHS:
                    picked = find_clip_vision(None, args.comfyui_dir, width=width)
                    if picked != files["clip"]:
                        files[f"clip_for_text_width_{width}"] = picked
        if text and getattr(args, "text", None):
            files["text"] = args.text
    except ModelNotFoundError as exc:
        if not args.selfcheck_if_missing:
            raise
        refuse_selfcheck_for_named_models(args, exc)
        return {**key(args.device or "cpu"), **selfcheck}
    return {**key(default_device(args.device)), "models": {k: _file_stamp(v) for k, v in files.items()}}


SELFCHECK_FAMILY = "sd21"  # the self-check's tiny SD models when no --family is given


def selfcheck_family(args) -> str:
    return getattr(args, "family", None) or SELFCHECK_FAMILY


def _tiny_pipeline(args, config: G4SegConfig, why: str):
    """The tiny random-weight models of --family (else sd21), on --device (else the CPU) in config.dtype."""
    from ..pipeline import G4SegPipeline

    family = selfcheck_family(args)
    pipe = G4SegPipeline.tiny(family=family, device=args.device or "cpu", dtype=config.dtype)
    return pipe, f"selfcheck (random weights{why}; tiny {family})"


def build_pipeline(args, config: G4SegConfig):
    from ..pipeline import G4SegPipeline
    from ..loading.precision import dtype_name

    if args.selfcheck:
        print(RANDOM_BANNER, file=sys.stderr)
        return _tiny_pipeline(args, config, "")
    try:
        pipe = G4SegPipeline.from_pretrained(args.checkpoint, clip=args.clip, comfyui_dir=args.comfyui_dir,
                                             family=args.family, device=args.device, dtype=config.dtype)
        files = ", ".join(str(f) for f in pipe.components.files)
        print(f"g4seg: SD weights {files}; CLIP {getattr(pipe.clip, 'name', 'clip')}; "
              f"{dtype_name(pipe.dtype)} ({pipe.dtype_reason})", file=sys.stderr)
        return pipe, "weights: " + files
    except ModelNotFoundError as exc:
        if not args.selfcheck_if_missing:
            raise
        refuse_selfcheck_for_named_models(args, exc)
        print(f"no weights found:\n{exc}\n", file=sys.stderr)
        print(RANDOM_BANNER, file=sys.stderr)
        return _tiny_pipeline(args, config, "; no weights found")


def load_image(path: Path, convert_rgb: bool, quiet: bool = False):
    """The picture as uint8 RGB (16-bit / float scaled, see image_files); notes what was converted."""
    from ..files.image_files import read_rgb

    picture = read_rgb(path)
    if picture.channels_converted and not convert_rgb:
        raise G4SegError(f"{path} is {picture.source}, not RGB: pass --convert-rgb to convert it")
    if picture.note and not quiet:
        print(f"note: {path.name}: {picture.source}; {picture.note}", file=sys.stderr)
    return picture.pixels
