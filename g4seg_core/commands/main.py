"""`g4seg` command line: refine | selfcheck | bench | eval | segment."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .options import (
    RANDOM_BANNER,
    add_config_arguments,
    add_model_arguments,
    build_pipeline,
    config_from_args,
    load_image,
)
from ..config import DTYPE_CHOICES, G4SegConfig
from ..errors import G4SegError
from ..files.image_files import IMAGE_EXTS, MASK_EXTS, files_by_stem
from ..files.output_files import os_error_message
from .evaluate import add_eval_parser
from .segment import add_segment_parser




# ---- refine ---------------------------------------------------------------------------
OUTPUT_SUFFIXES = {"refined_prob": "_refined_prob.png", "refined_mask": "_refined_mask.png",
                   "overlay": "_overlay.png", "generated": "_generated.png", "report": "_g4seg.json"}
RUN_REPORT = "g4seg_run.json"  # a folder run's list of done, skipped and failed images


def _pairs(image: Path, mask: Path) -> Tuple[List[Tuple[Path, Path]], Dict[str, str]]:
    """(image, mask) pairs and {image name: why it has no pair}."""
    for p in (image, mask):
        if not p.exists():
            raise G4SegError(f"{p} does not exist")
    if image.is_dir() != mask.is_dir():
        raise G4SegError("IMAGE and MASK must both be files or both be folders")
    if not image.is_dir():
        return [(image, mask)], {}
    images = files_by_stem(image, IMAGE_EXTS, "image")
    masks = files_by_stem(mask, MASK_EXTS, "mask")
    if not images:
        raise G4SegError(f"no images ({', '.join(IMAGE_EXTS)}) in {image}")
    pairs = [(images[s], masks[s]) for s in sorted(images) if s in masks]
    missing = {images[s].name: f"no mask named {s}.* ({', '.join(MASK_EXTS)}) in {mask}"
               for s in sorted(images) if s not in masks}
    return pairs, missing


def load_mask(path: Path, args):
    from ..method.label_maps import class_probability_from_file
    from ..files.mask_files import load_probability

    if args.mask_class is not None:  # index 0..254 or VOC name, parsed by argparse
        return class_probability_from_file(path, args.mask_class)[0]
    return load_probability(path)


def check_pair(image_path: Path, mask_path: Path, args, quiet: bool = False):
    """Read and check one pair as refine will (framing, mask range, empty/full): (image, mask)."""
    from ..method.masks import check_same_framing, validate_probability
    from ..method.softening import prepare_coarse

    image = load_image(image_path, args.convert_rgb, quiet=quiet)
    mask = validate_probability(load_mask(mask_path, args), name=f"mask {mask_path}")
    try:
        check_same_framing(image.shape[:2], mask.shape)
    except G4SegError as exc:
        raise G4SegError(f"{image_path.name} / {mask_path.name}: {exc}") from None
    prepare_coarse(mask, soften="none")  # the empty / full checks, without the softening work
    return image, mask


def output_files(out_dir: Path, stem: str) -> Dict[str, Path]:
    return {k: out_dir / f"{stem}{suffix}" for k, suffix in OUTPUT_SUFFIXES.items()}


def _comparable(parameters: dict) -> dict:
    return {k: v for k, v in parameters.items() if k != "device"}


def finished_before(out_dir: Path, image_path: Path, mask_path: Path, args, config: G4SegConfig) -> bool:
    """True if an earlier run wrote every output of this pair with the same parameters."""
    files = output_files(out_dir, image_path.stem)
    try:
        report = json.loads(files["report"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and all(p.is_file() for p in files.values())
            and report.get("image") == str(image_path) and report.get("mask") == str(mask_path)
            and report.get("label") == args.label and report.get("mask_class") == args.mask_class
            and _comparable(report.get("parameters") or {}) == _comparable(config.to_dict()))


def write_outputs(out_dir: Path, stem: str, image, result, extra: dict) -> dict:
    """Every output written atomically; the JSON report last (its presence means the set is complete)."""
    import numpy as np

    from ..files.mask_files import save_binary_png, save_probability_png16
    from ..files.output_files import atomic_write_text, save_image
    from ..files.visualize import before_after

    files = output_files(out_dir, stem)
    save_probability_png16(result.prob, files["refined_prob"])
    save_binary_png(result.binary, files["refined_mask"])
    # a picture travels without its JSON: say on it when the models were random
    title = "refined (G4Seg, RANDOM WEIGHTS: not a real result)" if extra.get("models", "").startswith("selfcheck") \
        else "refined (G4Seg)"
    save_image(before_after(np.asarray(image), result.coarse, result.prob, result.config.threshold,
                            refined_title=title), files["overlay"])
    save_image(result.generated, files["generated"])
    report = {"parameters": result.config.to_dict(), **result.summary(), **extra,
              "outputs": {k: str(v) for k, v in files.items()}}
    atomic_write_text(files["report"], json.dumps(report, indent=2))
    return report


def _item_error(exc: BaseException) -> str:
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)


def cmd_refine(args) -> int:
    from tqdm import tqdm

    from ..loading.precision import dtype_name

    from ..files.output_files import atomic_write_text, prepare_output_dir, refuse_overwriting_inputs
    from ..method.softening import uniform_map_warning

    config = config_from_args(args)
    folder = Path(args.image).is_dir()
    pairs, failures = _pairs(Path(args.image), Path(args.mask))
    planned = [(path, f"the {kind} of {image_path.name}") for image_path, _ in pairs
               for kind, path in output_files(Path(args.out), image_path.stem).items()]
    if folder:
        planned.append((Path(args.out) / RUN_REPORT, "the run report"))
    inputs = [p for pair in pairs for p in pair] + ([args.config] if args.config else [])
    refuse_overwriting_inputs(args.out, planned, inputs,
                              {"the image folder (IMAGE)": args.image, "the mask folder (MASK)": args.mask}
                              if folder else None)
    out_dir = prepare_output_dir(args.out)

    # Every pair is read and checked before any model loads; a folder run goes on without bad ones.
    todo, skipped, overwrite = [], [], []
    for image_path, mask_path in pairs:
        if args.skip_existing and finished_before(out_dir, image_path, mask_path, args, config):
            skipped.append(image_path.name)
            continue
        try:
            check_pair(image_path, mask_path, args, quiet=True)
        except (G4SegError, OSError) as exc:
            if not folder:
                raise
            failures[image_path.name] = _item_error(exc)
            continue
        todo.append((image_path, mask_path))
        if output_files(out_dir, image_path.stem)["report"].exists():
            overwrite.append(image_path.name)
    if skipped:
        print(f"skipping {len(skipped)} image(s) already refined in {out_dir} with these parameters "
              f"(--skip-existing)", file=sys.stderr)
    if overwrite:
        print(f"note: overwriting the earlier outputs of {len(overwrite)} image(s) in {out_dir} "
              f"({', '.join(overwrite[:3])}{', ...' if len(overwrite) > 3 else ''}); --skip-existing keeps "
              f"finished ones", file=sys.stderr)
    if failures:
        print(f"{len(failures)} image(s) fail the checks and are skipped (listed at the end)", file=sys.stderr)

    done = []
    if todo:
        pipe, models = build_pipeline(args, config)
        for image_path, mask_path in tqdm(todo, desc="g4seg refine", unit="image", disable=len(todo) == 1):
            try:
                image, mask = check_pair(image_path, mask_path, args)
                result = pipe.refine(image, mask, args.label, config)
                extra = {"image": str(image_path), "mask": str(mask_path), "mask_class": args.mask_class,
                         "models": models, "clip": getattr(pipe.clip, "name", "clip"),
                         "dtype_used": dtype_name(pipe.dtype), "dtype_reason": pipe.dtype_reason}
                write_outputs(out_dir, image_path.stem, image, result, extra)
            except (G4SegError, OSError) as exc:
                if not folder:
                    raise
                failures[image_path.name] = _item_error(exc)
                tqdm.write(f"{image_path.name}: failed, going on: {failures[image_path.name]}", file=sys.stderr)
                continue
            done.append(image_path.name)
            warning = uniform_map_warning(mask, config.threshold)
            if warning:
                print(f"warning: {image_path.name}: {warning}", file=sys.stderr)
            t = result.timings
            print(f"{image_path.name}: {result.summary()['changed_pixels']} pixels changed, "
                  f"{t['total']:.2f} s -> {out_dir}/{image_path.stem}_*")
    if folder:
        atomic_write_text(out_dir / RUN_REPORT, json.dumps(
            {"done": done, "skipped": skipped, "failed": [{"image": k, "error": v} for k, v in sorted(failures.items())]},
            indent=2))
        print(f"{len(done)} refined, {len(skipped)} skipped, {len(failures)} failed -> {out_dir / RUN_REPORT}",
              file=sys.stderr)
    if failures:
        print(f"{len(failures)} image(s) failed (fix them and rerun with --skip-existing to do just those):",
              file=sys.stderr)
        for name, error in sorted(failures.items()):
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


# ---- selfcheck / bench ------------------------------------------------------------------
def cmd_selfcheck(args) -> int:
    """Run every stage on tiny random models for each supported family."""
    import numpy as np

    from ..pipeline import G4SegPipeline

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
    p.add_argument("--mask-class", type=_mask_class,
                   help="MASK is a label map (palette, colour or grey class indices): the class to refine, an "
                        "index 0..254 or a VOC name (cat, potted plant)")
    p.add_argument("--convert-rgb", action="store_true",
                   help="convert greyscale (8/16-bit, float)/RGBA/palette images to RGB")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs an earlier run with the same parameters completed "
                        "(rerun a folder after fixing its failures)")
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

    add_eval_parser(sub)
    add_segment_parser(sub)
    return parser


def _mask_class(text: str) -> int:
    from ..files.palettes import parse_class_choice

    try:
        return parse_class_choice(text)
    except G4SegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done; 1 a folder run or eval finished but some images failed (listed); 2 error;
    130 interrupted (Ctrl-C)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # our own process never talks to a hub
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except G4SegError as exc:
        print(f"g4seg: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder we could not read or write: one line, no traceback
        print(f"g4seg: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are atomic: what is on disk is whole
        print("g4seg: interrupted; finished outputs are kept (rerun `refine` with --skip-existing, or the same "
              "`eval` command, to go on)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
