"""`g4seg refine IMAGE MASK --label cat --out DIR`: refine a coarse mask (or folders of them) with G4Seg.

Writes per image (STEM = the image's file name without extension):
    DIR/STEM_refined_prob.png   refined probability (16-bit PNG)
    DIR/STEM_refined_mask.png   its binary mask at --threshold
    DIR/STEM_overlay.png        before / after picture
    DIR/STEM_generated.png      the image Stable Diffusion generated
    DIR/STEM_g4seg.json         every parameter and the models; written last (its presence = the set is whole)
and for a folder run DIR/g4seg_run.json: which images were done, skipped and failed (why).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from ..errors import G4SegError
from ..files.image_files import MASK_EXTS, files_by_stem
from .folder_run import FOLDER_IMAGE_EXTS, FolderRun, device_for_rank, shard_from_env
from .options import (
    add_config_arguments,
    add_model_arguments,
    build_pipeline,
    check_given_model_paths,
    config_from_args,
    inputs_key,
    load_image,
    models_key,
)

OUTPUT_SUFFIXES = {"refined_prob": "_refined_prob.png", "refined_mask": "_refined_mask.png",
                   "overlay": "_overlay.png", "generated": "_generated.png", "report": "_g4seg.json"}
RUN_REPORT = "g4seg_run.json"  # a folder run's list of done, skipped and failed images
# knobs a one-class refine never uses: refused as flags, absent from the report and the rerun comparison
MULTICLASS_ONLY = ("bg_power",)


def add_refine_parser(sub) -> None:
    p = sub.add_parser("refine", help="refine a coarse mask (or folders of them)")
    p.add_argument("image", help="RGB image (or .npy), or a folder of them")
    p.add_argument("mask", help="coarse mask: binary/soft PNG (8/16-bit) or .npy; or a folder (same file stems)")
    p.add_argument("--label", required=True, help="class name, e.g. cat (goes into the prompt template)")
    p.add_argument("--out", required=True, help="output folder (not an input folder)")
    p.add_argument("--mask-class", type=_mask_class,
                   help="MASK is a label map (palette, colour or grey class indices): the class to refine, an "
                        "index 0..254 or a VOC name (cat, potted plant)")
    p.add_argument("--convert-rgb", action="store_true",
                   help="convert greyscale (8/16-bit, float)/RGBA/palette images to RGB")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs an earlier run with the same parameters and models completed "
                        "(rerun a folder after fixing its failures)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA only: run the VAE and CLIP image tower through torch.compile with CUDA graphs (the "
                        "first image of each size compiles for a minute; docs/BENCHMARKS.md says what it wins)")
    add_model_arguments(p)
    add_config_arguments(p)
    p.set_defaults(func=cmd_refine)


def _mask_class(text: str) -> int:
    from ..files.palettes import parse_class_choice

    try:
        return parse_class_choice(text)
    except G4SegError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _pairs(image: Path, mask: Path) -> Tuple[List[Tuple[Path, Path]], Dict[str, str]]:
    """(image, mask) pairs and {image name: why it has no pair}."""
    for p in (image, mask):
        if not p.exists():
            raise G4SegError(f"{p} does not exist")
    if image.resolve() == mask.resolve():  # each image would be refined with itself as its mask
        raise G4SegError(f"IMAGE and MASK are both {image}: give the coarse mask(s) as MASK (a folder of masks "
                         "named like the images)")
    if image.is_dir() != mask.is_dir():
        raise G4SegError("IMAGE and MASK must both be files or both be folders")
    if not image.is_dir():
        return [(image, mask)], {}
    images = files_by_stem(image, FOLDER_IMAGE_EXTS, "image", "STEM_refined_mask.png")
    masks = files_by_stem(mask, MASK_EXTS, "mask", "STEM_refined_mask.png")
    if not images:
        raise G4SegError(f"no images ({', '.join(FOLDER_IMAGE_EXTS)}) in {image}")
    pairs = [(images[s], masks[s]) for s in sorted(images) if s in masks]
    missing = {images[s].name: f"no mask named {s}.* ({', '.join(MASK_EXTS)}) in {mask}"
               for s in sorted(images) if s not in masks}
    return pairs, missing


def load_mask(path: Path, args):
    from ..files.mask_files import load_probability
    from ..method.label_maps import class_probability_from_file

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


def report_parameters(config) -> dict:
    """The parameters a one-class refine uses (its report's "parameters")."""
    return {k: v for k, v in config.to_dict().items() if k not in MULTICLASS_ONLY}


def _comparable(parameters: dict) -> dict:
    """The parameters that make a result, less device and dtype: models_key holds the device kind and the
    dtype resolved (--dtype auto and float32 on a CPU without bfloat16 are one run)."""
    return {k: v for k, v in parameters.items() if k not in ("device", "dtype") + MULTICLASS_ONLY}


def finished_before(out_dir: Path, image_path: Path, mask_path: Path, args, config, models: dict) -> bool:
    """True if an earlier run wrote every output of this pair with the same parameters and models (files or
    the self-check, device kind, dtype) on the same image and mask files (size and modification time): a
    self-check result never stands for a run with real weights, nor an old photo's for a new one's."""
    files = output_files(out_dir, image_path.stem)
    try:
        report = json.loads(files["report"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and all(p.is_file() for p in files.values())
            and report.get("image") == str(image_path) and report.get("mask") == str(mask_path)
            and report.get("label") == args.label and report.get("mask_class") == args.mask_class
            and report.get("models_key") == models and report.get("inputs_key") == inputs_key(image_path, mask_path)
            and _comparable(report.get("parameters") or {}) == _comparable(config.to_dict()))


def write_outputs(out_dir: Path, stem: str, image, result, extra: dict) -> dict:
    """Every output written as one set (whole or absent, output_files.FileSet); the JSON report last (its
    presence means the set is complete)."""
    import numpy as np

    from ..files.mask_files import save_binary_png, save_probability_png16
    from ..files.output_files import FileSet, atomic_write_text, save_image
    from ..files.visualize import before_after

    files = output_files(out_dir, stem)
    # a picture travels without its JSON: say on it when the models were random
    title = "refined (G4Seg, RANDOM WEIGHTS: not a real result)" if extra.get("models", "").startswith("selfcheck") \
        else "refined (G4Seg)"
    report = {"parameters": report_parameters(result.config), **result.summary(), **extra,
              "outputs": {k: str(v) for k, v in files.items()}}
    with FileSet() as staged:
        save_probability_png16(result.prob, staged.stage(files["refined_prob"]))
        save_binary_png(result.binary, staged.stage(files["refined_mask"]))
        save_image(before_after(np.asarray(image), result.coarse, result.prob, result.config.threshold,
                                refined_title=title), staged.stage(files["overlay"]))
        save_image(result.generated, staged.stage(files["generated"]))
        atomic_write_text(staged.stage(files["report"]), json.dumps(report, indent=2))
    return report


_KEEP_DECODED_BYTES = 1 << 30


def cmd_refine(args) -> int:
    from ..files.output_files import prepare_output_dir, refuse_overwriting_inputs
    from ..loading.precision import default_device, dtype_name
    from ..method.softening import uniform_map_warning
    from ..models.compiled import check_device as check_compile_device

    config = config_from_args(args)
    unused = [f"--{k.replace('_', '-')}" for k in MULTICLASS_ONLY if getattr(args, k, None) is not None]
    if unused:
        raise G4SegError(f"{', '.join(unused)} weights the background in the fusion of several classes (g4seg "
                         "segment --refine, g4seg eval); g4seg refine refines one class: drop it")
    check_given_model_paths(args)
    models_found = models_key(args, config.dtype)
    folder = Path(args.image).is_dir()
    pairs, unpaired = _pairs(Path(args.image), Path(args.mask))
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
    run = FolderRun("refine", folder, report=out_dir / RUN_REPORT, shard=shard_from_env())
    device_for_rank(args)
    run.fail_all({n: unpaired[n] for n in sorted(unpaired)[run.index::run.count]})
    name = lambda pair: pair[0].name  # noqa: E731
    # The check decodes each pair; what it decoded is kept for the run (each file decoded once) while the
    # kept pixels stay under _KEEP_DECODED_BYTES; beyond that, a folder's later pairs are decoded again.
    decoded: Dict[Tuple[Path, Path], tuple] = {}

    def check(pair):
        image, mask = check_pair(*pair, args)
        if sum(a.nbytes + b.nbytes for a, b in decoded.values()) + image.nbytes + mask.nbytes <= _KEEP_DECODED_BYTES:
            decoded[pair] = (image, mask)

    todo = run.check(run.my_share(pairs), name, check,
                     finished=(lambda pair: finished_before(out_dir, *pair, args, config, models_found))
                     if args.skip_existing
                     else None,
                     has_outputs=lambda pair: output_files(out_dir, pair[0].stem)["report"].exists())
    if todo:
        if args.compile:  # before the models load: a CPU run is refused at once
            check_compile_device("cpu" if args.selfcheck else default_device(args.device))
        pipe, models = build_pipeline(args, config)
        if args.compile:
            print(f"g4seg: compiling {', '.join(pipe.compile())} (the first image of each size takes longer)",
                  file=sys.stderr)

        def work(pair):
            image_path, mask_path = pair
            image, mask = decoded.pop(pair, None) or check_pair(image_path, mask_path, args, quiet=True)
            result = pipe.refine(image, mask, args.label, config)
            extra = {"image": str(image_path), "mask": str(mask_path), "mask_class": args.mask_class,
                     "models": models, "clip": getattr(pipe.clip, "name", "clip"),
                     "dtype_used": dtype_name(pipe.dtype), "dtype_reason": pipe.dtype_reason,
                     "models_key": models_found, "inputs_key": inputs_key(image_path, mask_path)}
            write_outputs(out_dir, image_path.stem, image, result, extra)
            warning = uniform_map_warning(mask, config.threshold)
            if warning:
                print(f"warning: {image_path.name}: {warning}", file=sys.stderr)
            return (f"{image_path.name}: {result.summary()['changed_pixels']} pixels changed, "
                    f"{result.timings['total']:.2f} s -> {out_dir}/{image_path.stem}_*")

        run.each(todo, name, work)
    return run.finish()
