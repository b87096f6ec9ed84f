"""`g4seg` command line: refine | selfcheck | bench | eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .config import DIRECTIONS, DTYPE_CHOICES, EMI_MODES, EMI_SCHEDULES, SOFTEN_MODES, G4SegConfig
from .errors import G4SegError, ModelNotFoundError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTS = (".png", ".npy", ".bmp", ".tif", ".tiff")
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
    g.add_argument("--dtype", choices=DTYPE_CHOICES,
                   help="model dtype (default auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on CUDA, else float32)")
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
    from .precision import dtype_name

    if args.selfcheck:
        print(RANDOM_BANNER, file=sys.stderr)
        return G4SegPipeline.tiny(device=args.device or "cpu", dtype=config.dtype), "selfcheck (random weights)"
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
        print(f"no weights found:\n{exc}\n", file=sys.stderr)
        print(RANDOM_BANNER, file=sys.stderr)
        return (G4SegPipeline.tiny(device=args.device or "cpu", dtype=config.dtype),
                "selfcheck (random weights; no weights found)")


# ---- refine ---------------------------------------------------------------------------
def _pairs(image: Path, mask: Path) -> List[Tuple[Path, Path]]:
    if image.is_dir() != mask.is_dir():
        raise G4SegError("IMAGE and MASK must both be files or both be folders")
    if not image.is_dir():
        for p in (image, mask):
            if not p.exists():
                raise G4SegError(f"{p} does not exist")
        return [(image, mask)]
    masks = {p.stem: p for p in sorted(mask.iterdir()) if p.suffix.lower() in MASK_EXTS}
    pairs, missing = [], []
    for img in sorted(p for p in image.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        m = masks.get(img.stem)
        (pairs.append((img, m)) if m else missing.append(img.name))
    if missing:
        raise G4SegError(f"no mask with the same name (stem) in {mask} for: {', '.join(missing[:10])}")
    if not pairs:
        raise G4SegError(f"no images ({', '.join(IMAGE_EXTS)}) in {image}")
    return pairs


def load_image(path: Path, convert_rgb: bool):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise G4SegError(f"cannot read image {path}: {exc}") from exc
    if image.mode != "RGB":
        if not convert_rgb:
            raise G4SegError(f"{path} is {image.mode}, not RGB: pass --convert-rgb to convert it")
        print(f"note: converting {path.name} from {image.mode} to RGB (--convert-rgb)", file=sys.stderr)
        image = image.convert("RGB")
    return image


def load_mask(path: Path, args):
    from . import masks

    if args.mask_class is not None:  # a VOC name or index; resolved by class_probability_from_label_map
        return masks.class_probability_from_label_map(masks.load_label_map(path), args.mask_class)
    return masks.load_probability(path)


def write_outputs(out_dir: Path, stem: str, image, result, extra: dict) -> dict:
    import numpy as np

    from . import masks
    from .visualize import before_after

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"refined_prob": out_dir / f"{stem}_refined_prob.png", "refined_mask": out_dir / f"{stem}_refined_mask.png",
             "overlay": out_dir / f"{stem}_overlay.png", "generated": out_dir / f"{stem}_generated.png",
             "report": out_dir / f"{stem}_g4seg.json"}
    masks.save_probability_png16(result.prob, files["refined_prob"])
    masks.save_binary_png(result.binary, files["refined_mask"])
    # a picture travels without its JSON: say on it when the models were random
    title = "refined (G4Seg, RANDOM WEIGHTS: not a real result)" if extra.get("models", "").startswith("selfcheck") \
        else "refined (G4Seg)"
    before_after(np.asarray(image), result.coarse, result.prob, result.config.threshold,
                 refined_title=title).save(files["overlay"])
    result.generated.save(files["generated"])
    report = {"parameters": result.config.to_dict(), **result.summary(), **extra,
              "outputs": {k: str(v) for k, v in files.items()}}
    files["report"].write_text(json.dumps(report, indent=2))
    return report


def cmd_refine(args) -> int:
    from tqdm import tqdm

    from .precision import dtype_name

    config = config_from_args(args)
    pairs = _pairs(Path(args.image), Path(args.mask))
    pipe, models = build_pipeline(args, config)
    out_dir = Path(args.out)
    reports = []
    for image_path, mask_path in tqdm(pairs, desc="g4seg refine", unit="image", disable=len(pairs) == 1):
        image = load_image(image_path, args.convert_rgb)
        mask = load_mask(mask_path, args)
        result = pipe.refine(image, mask, args.label, config)
        extra = {"image": str(image_path), "mask": str(mask_path), "models": models,
                 "clip": getattr(pipe.clip, "name", "clip"), "dtype_used": dtype_name(pipe.dtype),
                 "dtype_reason": pipe.dtype_reason}
        reports.append(write_outputs(out_dir, image_path.stem, image, result, extra))
        t = result.timings
        print(f"{image_path.name}: {result.summary()['changed_pixels']} pixels changed, "
              f"{t['total']:.2f} s -> {out_dir}/{image_path.stem}_*")
    return 0


# ---- selfcheck / bench ------------------------------------------------------------------
def cmd_selfcheck(args) -> int:
    """Run every stage on tiny random models for each supported family."""
    import numpy as np

    from .pipeline import G4SegPipeline

    print(RANDOM_BANNER)
    rng = np.random.default_rng(0)
    image = (rng.random((96, 80, 3)) * 255).astype(np.uint8)
    mask = np.zeros((96, 80), np.float32)
    mask[20:70, 15:60] = 1
    config = G4SegConfig(size=64, correspondence_grid=0)
    for family, prediction in (("sd15", "epsilon"), ("sd21", "epsilon"), ("sd21v", "v_prediction"),
                               ("sdxl", "epsilon")):
        start = time.perf_counter()
        result = G4SegPipeline.tiny(family=family, prediction_type=prediction).refine(image, mask, "cat", config)
        assert result.prob.shape == mask.shape and np.isfinite(result.prob).all()
        print(f"ok  {family:6s} {prediction:13s} {time.perf_counter() - start:.2f} s")
    print("selfcheck passed (installation works; load real weights for real masks)")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g4seg", description="G4Seg: refine coarse segmentation masks with "
                                                               "Stable Diffusion (no downloads, ever).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refine", help="refine a coarse mask (or folders of them)")
    p.add_argument("image", help="RGB image, or a folder of images")
    p.add_argument("mask", help="coarse mask: binary/soft PNG (8/16-bit) or .npy; or a folder (same file stems)")
    p.add_argument("--label", required=True, help="class name, e.g. cat (goes into the prompt template)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mask-class", help="MASK is a VOC palette label map: the class (index or VOC name) to refine")
    p.add_argument("--convert-rgb", action="store_true", help="convert grayscale/RGBA/palette images to RGB")
    add_model_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("selfcheck", help="run every stage on tiny random-weight models (no weights needed)")
    p.set_defaults(func=cmd_selfcheck)

    p = sub.add_parser("bench", help="per-stage time and memory on a full-size SD2.1-architecture model")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="default auto: bfloat16 on CPUs with AVX512-BF16/AMX, float16 on CUDA, else float32")
    p.add_argument("--reference", default="float32", choices=("float32", "none"),
                   help="when the dtype is not float32, also run float32 on the same weights in the same run: "
                        "time ratio per stage and agreement of the outputs (default float32; none skips it)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=None,
                   help="also time refine_batch on this many images, for images per second (default: 8 on a GPU, "
                        "off on CPU; 0 turns it off)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)

    try:
        from .evaluation.cli import add_eval_parser
    except ImportError:
        add_eval_parser = None
    if add_eval_parser is not None:
        add_eval_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # our own process never talks to a hub
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except G4SegError as exc:
        print(f"g4seg: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
