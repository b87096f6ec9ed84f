"""Where model weights are found, without downloading anything.

Search order, for both the SD checkpoint and the CLIP image encoder:
  1. the explicit path given (CLI --checkpoint / --clip, a node input, an argument);
  2. the environment variable G4SEG_CHECKPOINT / G4SEG_CLIP;
  3. a ComfyUI install (`comfyui_dir`, else $COMFYUI_PATH):
       checkpoints: models/checkpoints/**.safetensors|.ckpt, then models/diffusers/*/ (folders
                    with model_index.json);
       CLIP vision: models/clip_vision/**.safetensors|.bin|.pt|.pth;
     each together with the folders its extra_model_paths.yaml lists under `checkpoints`,
     `diffusers` and `clip_vision` (base_path joined like ComfyUI does; e.g. an A1111 install).
When several files qualify, the choice is deterministic and logged:
  checkpoints: SD2.1 names first (the paper's model: 'sd2', 'sd21', 'v2-1', '2-1', '2.1'),
               then SD1.5 names ('sd15', 'v1-5', '1-5', '1.5'), then SDXL names ('xl'), then
               the rest; names of unsupported models (flux, sd3, svd, cascade, inpaint,
               refiner, ...) come last; ties broken by the lower-cased relative path.
  CLIP vision: ViT-B/16 names first (the paper's encoder), then ViT-L, then ViT-H
               ('clip_vision_h'), then bigG ('clip_vision_g'), then the rest; same tie-break.
Nothing found raises ModelNotFoundError listing every place looked and how to point at weights.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..errors import ModelNotFoundError

log = logging.getLogger("g4seg")

CHECKPOINT_ENV = "G4SEG_CHECKPOINT"
CLIP_ENV = "G4SEG_CLIP"
COMFYUI_ENV = "COMFYUI_PATH"
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
CLIP_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth")

# (pattern on the lower-cased file name, rank); first match wins, unmatched = len(list).
_CHECKPOINT_RANKS: List[Tuple[str, int]] = [
    (r"flux|sd3|sd_3|stable_cascade|cascade|svd|video|inpaint|instruct|pix2pix|depth|upscale|refiner|unclip", 9),
    (r"sd2|sd_2|v2-1|v2_1|2-1|2\.1|21[-_]?base|sd21", 0),
    (r"sd15|sd_15|sd1\.5|sd1-5|v1-5|v1_5|1-5|1\.5", 1),
    (r"xl", 2),
]
_CLIP_RANKS: List[Tuple[str, int]] = [
    (r"vit-b-16|vit_b_16|vit-b/16|vitb16|b-16|b16", 0),
    (r"vit-l|vit_l|vitl|clip_vision_l|large", 1),
    (r"vit-h|vit_h|vith|clip_vision_h|huge", 2),
    (r"bigg|clip_vision_g|vit-g|vit_g", 3),
]


def _rank(name: str, table: Sequence[Tuple[str, int]]) -> int:
    lowered = name.lower()
    for pattern, rank in table:
        if re.search(pattern, lowered):
            return rank
    return len(table)


def _pick(candidates: List[Tuple[Path, Path]], table, kind: str) -> Optional[Path]:
    """Best of (folder, path) pairs: by name rank, then folder order, then relative path."""
    if not candidates:
        return None
    order = {folder: i for i, folder in enumerate(dict.fromkeys(folder for folder, _ in candidates))}
    ordered = [p for _, p in sorted(candidates, key=lambda fp: (_rank(fp[1].name, table), order[fp[0]],
                                                                  str(fp[1].relative_to(fp[0])).lower()))]
    chosen = ordered[0]
    if len(ordered) > 1:
        others = ", ".join(p.name for p in ordered[1:6]) + (" ..." if len(ordered) > 6 else "")
        log.info("%s: using %s (of %d found; also %s). Choose another with an explicit path.",
                 kind, chosen, len(ordered), others)
    else:
        log.info("%s: using %s", kind, chosen)
    return chosen


def extra_model_folders(root: Path) -> Dict[str, List[Path]]:
    """{folder key ('checkpoints', 'clip_vision', ...): folders} from ROOT/extra_model_paths.yaml.

    Each top-level section may have a base_path (relative to the yaml's folder, ~ expanded);
    a key holds one folder or several, one per line, joined to base_path unless absolute.
    """
    config = Path(root) / "extra_model_paths.yaml"
    if not config.is_file():
        return {}
    try:
        import yaml  # PyYAML comes with huggingface_hub (a diffusers/transformers dependency)
    except ImportError:
        raise ModelNotFoundError(f"{config} lists model folders but PyYAML is missing: pip install pyyaml") from None
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelNotFoundError(f"cannot read {config}: {exc}. Fix the file (ComfyUI reads it too) or "
                                 "point at the weights with --checkpoint/--clip") from None
    folders: Dict[str, List[Path]] = {}
    for section in (data or {}).values() if isinstance(data, dict) else []:
        if not isinstance(section, dict):
            continue
        base = section.get("base_path")
        base = Path(os.path.expanduser(str(base))) if base else None
        if base is not None and not base.is_absolute():
            base = config.parent / base
        for key, value in section.items():
            if key == "base_path" or not isinstance(value, str):
                continue
            for line in value.splitlines():
                line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()  # block values may carry comments
                if line:
                    path = Path(os.path.expanduser(line))
                    folders.setdefault(key, []).append(path if path.is_absolute() else (base or config.parent) / path)
    return folders


def _files(folder: Path, extensions: Sequence[str]) -> List[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions]


def _comfyui_root(comfyui_dir) -> Tuple[Optional[Path], str]:
    if comfyui_dir:
        return Path(os.path.expanduser(str(comfyui_dir))), "comfyui_dir"
    env = os.environ.get(COMFYUI_ENV)
    if env:
        return Path(os.path.expanduser(env)), f"${COMFYUI_ENV}"
    return None, ""


def _explicit(value, what: str, flag: str) -> Path:
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise ModelNotFoundError(f"{what} {path} (from {flag}) does not exist: check the path")
    return path


def _search(explicit, env_var: str, flag: str, resolve, comfyui_dir,
            kinds: Sequence[Tuple[str, Callable[[Path], List[Path]], str]], table, kind: str):
    """(found, looked): explicit path, then $env_var, then each kind of ComfyUI folder in turn.

    kinds: (ComfyUI folder name, candidates in one folder, what "nothing there" means); each
    is searched in ROOT/models/<name> and in the extra_model_paths.yaml folders for <name>.
    """
    if explicit:
        return resolve(explicit, flag), []
    env = os.environ.get(env_var)
    if env:
        return resolve(env, f"${env_var}"), []
    looked = [f"{flag} (not given)", f"${env_var} (not set)"]
    root, origin = _comfyui_root(comfyui_dir)
    if root is None:
        looked.append(f"a ComfyUI install (--comfyui-dir not given, ${COMFYUI_ENV} not set)")
        return None, looked
    extra = extra_model_folders(root)
    for name, candidates, nothing in kinds:
        folders = [root / "models" / name] + extra.get(name, [])
        found = _pick([(folder, path) for folder in folders for path in candidates(folder)], table, kind)
        if found:
            return found, looked
        for folder in folders:
            looked.append(f"{folder} (from {origin}): {nothing}" + ("" if folder.is_dir() else ", folder missing"))
    return None, looked


def _diffusers_folders(folder: Path) -> List[Path]:
    return [p for p in folder.iterdir() if (p / "model_index.json").is_file()] if folder.is_dir() else []


def find_checkpoint(explicit: Union[str, Path, None] = None, comfyui_dir: Union[str, Path, None] = None) -> Path:
    """SD checkpoint: a single .safetensors/.ckpt file or a diffusers folder (see the module docstring)."""
    found, looked = _search(
        explicit, CHECKPOINT_ENV, "--checkpoint", lambda value, flag: _explicit(value, "checkpoint", flag),
        comfyui_dir,
        [("checkpoints", lambda f: _files(f, CHECKPOINT_EXTENSIONS), f"no {'/'.join(CHECKPOINT_EXTENSIONS)} files"),
         ("diffusers", _diffusers_folders, "no diffusers folders with model_index.json")],
        _CHECKPOINT_RANKS, "checkpoint")
    if found:
        return found
    raise ModelNotFoundError(
        "no Stable Diffusion checkpoint found. Looked at:\n  - " + "\n  - ".join(looked) +
        "\nPoint at one with --checkpoint PATH (a .safetensors/.ckpt file or a diffusers folder), "
        f"${CHECKPOINT_ENV}=PATH, or --comfyui-dir / ${COMFYUI_ENV} (searches models/checkpoints, "
        "models/diffusers and the folders its extra_model_paths.yaml lists). G4Seg never downloads weights; SD2.1 (v2-1_512-ema-pruned.safetensors) is the "
        "paper's model. `g4seg selfcheck` runs without any weights.")


# Names of image encoders by embedding width: text -> mask prefers the one its text tower pairs with.
_CLIP_FOR_WIDTH = {512: _CLIP_RANKS[0][0], 768: _CLIP_RANKS[1][0], 1024: _CLIP_RANKS[2][0], 1280: _CLIP_RANKS[3][0]}
CLIP_SEARCH_WIDTHS = tuple(_CLIP_FOR_WIDTH)  # the widths for which find_clip_vision may pick another file


def find_clip_vision(explicit: Union[str, Path, None] = None,
                     comfyui_dir: Union[str, Path, None] = None, width: Optional[int] = None) -> Union[Path, str]:
    """CLIP image encoder weights: a path, or an 'open_clip-name:path' string kept as given.

    width: the text tower's embedding width, when the encoder must pair with it (1024 -> ViT-H names
    first, 1280 -> bigG); an explicit path or $G4SEG_CLIP still wins.
    """
    from .clip_loading import split_clip_spec

    def resolve(value, flag):
        name, file = split_clip_spec(value)
        path = _explicit(file, "CLIP image encoder weights", flag)
        return f"{name}:{path}" if name else path

    found, looked = _search(
        explicit, CLIP_ENV, "--clip", resolve, comfyui_dir,
        [("clip_vision", lambda f: _files(f, CLIP_EXTENSIONS), f"no {'/'.join(CLIP_EXTENSIONS)} files")],
        ([(_CLIP_FOR_WIDTH[width], -1)] + _CLIP_RANKS) if width in _CLIP_FOR_WIDTH else _CLIP_RANKS, "CLIP vision")
    if found:
        return found
    raise ModelNotFoundError(
        "no CLIP image encoder found. Looked at:\n  - " + "\n  - ".join(looked) +
        "\nPoint at one with --clip PATH (a models/clip_vision .safetensors, open_clip weights, or "
        f"'ViT-B-16:/path/open_clip_pytorch_model.bin'), ${CLIP_ENV}=PATH, or --comfyui-dir / ${COMFYUI_ENV} "
        "(searches models/clip_vision and the folders its extra_model_paths.yaml lists). G4Seg never downloads weights; the paper uses CLIP ViT-B/16.")
