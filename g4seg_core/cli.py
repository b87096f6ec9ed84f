"""`g4seg` command line: refine | selfcheck | bench | eval."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from .cli_options import RANDOM_BANNER, add_config_arguments, add_model_arguments, build_pipeline, config_from_args
from .config import G4SegConfig
from .errors import G4SegError
from .evaluation.cli import add_eval_parser

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
MASK_EXTS = (".png", ".npy", ".bmp", ".tif", ".tiff")



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
    from .label_maps import class_probability_from_label_map
    from .mask_files import load_label_map, load_probability

    if args.mask_class is not None:  # a VOC name or index; resolved by class_probability_from_label_map
        return class_probability_from_label_map(load_label_map(path), args.mask_class)
    return load_probability(path)


def write_outputs(out_dir: Path, stem: str, image, result, extra: dict) -> dict:
    import numpy as np

    from .mask_files import save_binary_png, save_probability_png16
    from .visualize import before_after

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"refined_prob": out_dir / f"{stem}_refined_prob.png", "refined_mask": out_dir / f"{stem}_refined_mask.png",
             "overlay": out_dir / f"{stem}_overlay.png", "generated": out_dir / f"{stem}_generated.png",
             "report": out_dir / f"{stem}_g4seg.json"}
    save_probability_png16(result.prob, files["refined_prob"])
    save_binary_png(result.binary, files["refined_mask"])
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
                 "clip": getattr(pipe.clip, "name", "clip")}
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
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default: float16 on a GPU, float32 on CPU")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=None,
                   help="also time refine_batch on this many images, for images per second (default: 8 on a GPU, "
                        "off on CPU; 0 turns it off)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_bench)

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
