"""`g4seg segment IMAGE --classes "cat, sofa, person" --out DIR [--refine]`: words -> coarse masks.

Writes per image (STEM = the image's file name without extension):
    DIR/STEM.png             label map (VOC-palette PNG: 0 background, 1.. the classes in the given order;
                             the PNG records the class names, which `g4seg eval --coarse` maps by name)
    DIR/STEM_<class>.png     per-class probability (16-bit PNG, 0..65535 = 0..1)
    DIR/STEM_overlay.jpg     the image tinted with the label map, with a legend
    DIR/STEM_segment.json    every parameter, the model files, class fractions, timings
    DIR/g4seg_segment_run.json   (a folder) which images were done, skipped and failed (why)
and with --refine (G4Seg per class present in the label map, then multi-class fusion):
    DIR/refined/STEM.png, DIR/refined/STEM_<class>.png, DIR/refined/STEM_overlay.jpg

DIR is laid out as `g4seg eval --coarse DIR` reads coarse masks (<id>.png label maps), so
`g4seg segment VOC/JPEGImages --classes voc --out coarse/` then `g4seg eval VOC --coarse coarse/`
reproduces the paper's Table I chain (training-free segmenter -> + G4Seg) for anyone with weights.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

from .options import (
    RANDOM_BANNER,
    add_config_arguments,
    add_model_arguments,
    check_given_model_paths,
    config_from_args,
    inputs_key,
    load_image,
    models_key,
    refuse_selfcheck_for_named_models,
)
from ..errors import G4SegError, ModelNotFoundError
from ..files.image_files import files_by_stem
from .folder_run import FOLDER_IMAGE_EXTS, FolderRun, device_for_rank, shard_from_env



def add_segment_parser(sub) -> None:
    from ..zeroshot import SEGMENTER_KNOBS

    p = sub.add_parser("segment", help="words -> coarse masks: class names to per-class probabilities and a label map "
                                       "(training-free, on a CLIP you already have); --refine adds G4Seg")
    p.add_argument("image", help="RGB image, or a folder of images")
    p.add_argument("--classes", required=True,
                   help="class names, e.g. 'cat, sofa|couch, person' (',' or new lines between classes, '|' between "
                        "synonyms of one class); 'voc' = the 20 PASCAL VOC classes in VOC order")
    p.add_argument("--out", required=True, help="output folder (not the image folder)")
    p.add_argument("--text", help="CLIP text tower with its projection: an SD2.x/SDXL single-file checkpoint, a full "
                                  "open_clip CLIP file ('ViT-B-16:/path/open_clip_pytorch_model.bin') or an SDXL "
                                  "diffusers folder (default: --clip when it holds a text tower, else the SD checkpoint)")
    p.add_argument("--refine", action="store_true",
                   help="refine each class present with G4Seg (needs the SD checkpoint) and fuse the classes")
    p.add_argument("--convert-rgb", action="store_true", help="convert grayscale/RGBA/palette images to RGB")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose outputs an earlier run with the same classes, parameters and models "
                        "completed (rerun a folder after fixing its failures, or after Ctrl-C)")
    add_model_arguments(p)
    SEGMENTER_KNOBS.add_arguments(p.add_argument_group("segmenter (defaults: the NACLIP recipe)"), dest_prefix="zs_")
    add_config_arguments(p)  # G4Seg parameters (used by --refine), --device, --dtype
    p.set_defaults(func=cmd_segment)


def segmenter_config(args):
    from ..zeroshot import SEGMENTER_KNOBS, ZeroShotConfig

    return ZeroShotConfig.from_dict(SEGMENTER_KNOBS.values_from_args(args, dest_prefix="zs_"))


def _device(args):
    from ..loading.precision import default_device

    return default_device(args.device)


def _tiny(why: str, config, args):
    """The tiny random CLIP, on --device (else the CPU, as refine's self-check) in --dtype: every segmenter
    knob, device and dtype are used as with weights, and recorded as they are there."""
    from ..loading.precision import dtype_name, resolve_dtype
    from ..models.tiny import tiny_text_to_mask

    print(RANDOM_BANNER, file=sys.stderr)
    device = args.device or "cpu"
    choice = resolve_dtype(args.dtype, device)
    features, tower = tiny_text_to_mask(sigma=config.sigma)
    features = features.to(device, choice.dtype)
    tower.module.to(device, choice.dtype)
    return features, tower, {"models": f"selfcheck (random weights{why})", "random_weights": True,
                             "device": device, "dtype": f"{dtype_name(choice.dtype)} ({choice.reason})"}


def load_models(args, config):
    """(NACLIP features, text tower, description) from the flags; the tiny self-check when asked or missing."""
    from ..loading.model_files import find_checkpoint, find_clip_vision
    from ..zeroshot import load_matching_features, load_text_tower

    if args.selfcheck:
        return _tiny("", config, args)
    from ..loading.precision import dtype_name, resolve_dtype

    device = _device(args)
    choice = resolve_dtype(args.dtype, device)  # "auto": bfloat16 on CPUs with native bf16, float16 on CUDA
    dtype = choice.dtype
    try:
        tower, text_source = None, args.text
        if text_source is None and args.clip:
            try:  # a full open_clip CLIP file carries both towers
                tower, text_source = load_text_tower(args.clip, device=device, dtype=dtype), args.clip
            except G4SegError:
                tower = None
        if tower is None:
            text_source = text_source or find_checkpoint(args.checkpoint, args.comfyui_dir)
            tower = load_text_tower(text_source, device=device, dtype=dtype)
        clip = find_clip_vision(args.clip, args.comfyui_dir, width=tower.width)
    except ModelNotFoundError as exc:
        if not args.selfcheck_if_missing:
            raise
        refuse_selfcheck_for_named_models(args, exc)
        print(f"no weights found:\n{exc}\n", file=sys.stderr)
        return _tiny("; no weights found", config, args)
    features = load_matching_features(clip, tower, config.sigma, device, dtype)
    print(f"g4seg segment: text {tower.name}; vision {features.name}", file=sys.stderr)
    return features, tower, {"models": "weights", "random_weights": False, "text": str(text_source),
                             "text_tower": tower.name, "clip": str(clip), "clip_vision": features.name,
                             "device": str(device), "dtype": f"{dtype_name(dtype)} ({choice.reason})"}


def class_file_names(names) -> List[str]:
    """File-name-safe class names ('potted plant' -> 'potted_plant'); two classes may not share one."""
    out = [re.sub(r"[^\w\-]+", "_", n).strip("_") or f"class{i + 1}" for i, n in enumerate(names)]
    clashes = sorted({n for n in out if out.count(n) > 1})
    if clashes:
        raise G4SegError(f"class names {clashes} collide as file names: rename the classes")
    return out


def _images(path: Path) -> List[Path]:
    if path.is_dir():
        found = sorted(files_by_stem(path, FOLDER_IMAGE_EXTS, "image", "STEM.png, STEM_segment.json").values())
        if not found:
            raise G4SegError(f"no images ({', '.join(FOLDER_IMAGE_EXTS)}) in {path}")
        return found
    if not path.exists():
        raise G4SegError(f"{path} does not exist")
    return [path]


def segmentation_files(out_dir: Path, stem: str, file_names) -> Dict[str, Path]:
    """The files one image's segmentation is written to (the label map, one probability map per class, the
    overlay); the same names under OUT/refined/ for --refine."""
    files = {"labels": out_dir / f"{stem}.png", "overlay": out_dir / f"{stem}_overlay.jpg"}
    files.update({f"prob_{name}": out_dir / f"{stem}_{name}.png" for name in file_names})
    return files


def report_file(out_dir: Path, stem: str) -> Path:
    return out_dir / f"{stem}_segment.json"


def planned_outputs(out_dir: Path, images: List[Path], file_names, refine: bool) -> List[Tuple[Path, str]]:
    """(file, what writes it) for every file this run may write (to refuse clashes before any work)."""
    planned = []
    for path in images:
        for folder, what in ((out_dir, ""), (out_dir / "refined", "refined ")):
            if folder != out_dir and not refine:
                continue
            for kind, file in segmentation_files(folder, path.stem, file_names).items():
                kind = f"class {kind[5:]!r} probability" if kind.startswith("prob_") else \
                    {"labels": "label map", "overlay": "overlay"}[kind]
                planned.append((file, f"the {what}{kind} of {path.name}"))
        planned.append((report_file(out_dir, path.stem), f"the report of {path.name}"))
    return planned


def write_segmentation(out_dir: Path, stem: str, image, result, file_names, title: str, stage) -> dict:
    """The label map, the class probabilities and the overlay, each written to stage(its path) (a FileSet's)."""
    import numpy as np

    from ..files.mask_files import save_label_map_png, save_probability_png16
    from ..files.output_files import save_image
    from ..files.visualize import label_overlay

    files = segmentation_files(out_dir, stem, file_names)
    save_label_map_png(result["labels"], stage(files["labels"]),
                       label_names=("background",) + tuple(result["names"]))
    for name, prob in zip(file_names, result["probs"]):
        save_probability_png16(np.clip(prob, 0, 1), stage(files[f"prob_{name}"]))
    save_image(label_overlay(np.asarray(image), result["labels"], result["names"], title), stage(files["overlay"]),
               format="JPEG", quality=92)
    return {k: str(v) for k, v in files.items()}


RUN_REPORT = "g4seg_segment_run.json"  # a folder run's list of done, skipped and failed images


def refused_without_refine(args) -> List[str]:
    """The flags given that only --refine uses (G4Seg parameters, --config, --family): said, not ignored."""
    from ..config import KNOBS

    given = [k.cli_flag for k in KNOBS if k.cli_flag and k.name not in ("device", "dtype")
             and getattr(args, k.name, None) is not None]
    return given + [flag for flag, dest in (("--config", "config"), ("--family", "family"))
                    if getattr(args, dest, None) is not None]


def rerun_key(path: Path, segmenter_parameters: dict, classes, g4seg_config, models: dict) -> dict:
    """What makes an earlier result of this image the same result (--skip-existing): the image (its path, size and
    modification time), classes, parameters, and the models (files, or the self-check; device kind and dtype)."""
    refine = None
    if g4seg_config is not None:
        # the device kind and the resolved dtype are in models
        refine = {k: v for k, v in g4seg_config.to_dict().items() if k not in ("device", "dtype")}
    return {"image": str(path), "image_file": inputs_key(path)[0], "parameters": segmenter_parameters,
            "synonyms": [list(s) for s in classes.synonyms],
            "background": list(classes.background), "refine": refine, "models": models}


def finished_before(out_dir: Path, path: Path, key: dict) -> bool:
    try:
        report = json.loads(report_file(out_dir, path.stem).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and report.get("rerun_key") == key
            and isinstance(report.get("outputs"), dict)
            and all(Path(p).is_file() for p in report["outputs"].values())
            and all(Path(p).is_file() for p in ((report.get("refine") or {}).get("outputs") or {}).values()))


def cmd_segment(args) -> int:
    from ..files.output_files import prepare_output_dir, refuse_overwriting_inputs
    from ..loading.precision import check_device
    from ..zeroshot import ZeroShotSegmenter, parse_classes, plan

    # every check that needs no model first: settings, classes, every image decoded, the output folder
    if not args.refine:
        unused = refused_without_refine(args)
        if unused:
            raise G4SegError(f"{', '.join(unused)} set(s) G4Seg refinement, which runs only with --refine: add "
                             "--refine, or drop them")
    config = segmenter_config(args)
    if args.device:
        check_device(args.device)  # the G4Seg knob's own check (refine's config runs it)
    classes = parse_classes(args.classes, config.background)
    file_names = class_file_names(classes.classes)
    images = _images(Path(args.image))
    folder_run = Path(args.image).is_dir()
    g4seg_config = config_from_args(args) if args.refine else None
    check_given_model_paths(args)
    models = models_key(args, args.dtype, sd=args.refine, text=True, clip_for_text=True)
    refuse_overwriting_inputs(args.out, planned_outputs(Path(args.out), images, file_names, args.refine)
                              + ([(Path(args.out) / RUN_REPORT, "the run report")] if folder_run else []),
                              images + ([args.config] if args.config else []),
                              {"the image folder (IMAGE)": args.image} if folder_run else None)
    out_dir = prepare_output_dir(args.out)
    keys = {path: rerun_key(path, config.to_dict(), classes, g4seg_config, models) for path in images}

    run = FolderRun("segment", folder_run, report=out_dir / RUN_REPORT, shard=shard_from_env())
    device_for_rank(args)
    todo = run.check(run.my_share(images), lambda path: path.name,
                     lambda path: plan(config, *load_image(path, args.convert_rgb, quiet=True).shape[:2]),
                     finished=(lambda path: finished_before(out_dir, path, keys[path])) if args.skip_existing
                     else None,
                     has_outputs=lambda path: report_file(out_dir, path.stem).exists())
    if todo:
        features, tower, models = load_models(args, config)
        segmenter = ZeroShotSegmenter(features, tower, config)
        pipe = None
        if args.refine:
            from .options import build_pipeline

            pipe, refine_models = build_pipeline(args, g4seg_config)
            models["refine_models"] = refine_models
        random = models["random_weights"] or models.get("refine_models", "").startswith("selfcheck")
        title = "RANDOM WEIGHTS: not a real result" if random else ""
        if classes.dropped_background:
            print(f"note: {', '.join(classes.dropped_background)} listed as class(es), so not used as background",
                  file=sys.stderr)

        def work(path):
            report = _segment_one(path, args, segmenter, classes, file_names, out_dir, models, title, pipe,
                                  g4seg_config, random, keys[path])
            shares = ", ".join(f"{k} {v:.0%}" for k, v in report["label_fractions"].items() if v > 0)
            return f"{path.name}: {shares} -> {out_dir}/{path.stem}*"

        run.each(todo, lambda path: path.name, work)
    return run.finish()


def _window_progress(name: str, config, shape):
    """A progress callback that says every tenth of the windows done, for images of many windows; else None."""
    from ..zeroshot import plan

    total = plan(config, shape[0], shape[1])[1]
    if total < PROGRESS_FROM_WINDOWS:
        return None
    done, said = [0], [0]
    print(f"{name}: {total} windows", file=sys.stderr)

    def progress(n: int) -> None:
        done[0] += n
        if done[0] * 10 // total > said[0]:
            said[0] = done[0] * 10 // total
            print(f"{name}: {done[0]}/{total} windows", file=sys.stderr, flush=True)

    return progress


PROGRESS_FROM_WINDOWS = 100  # the defaults need 6 for a 4:3 photo


def _segment_one(path, args, segmenter, classes, file_names, out_dir, models, title, pipe, g4seg_config, random,
                 key):
    import numpy as np

    from ..files.output_files import FileSet, atomic_write_text

    image = load_image(path, args.convert_rgb)
    start = time.perf_counter()
    # everything is computed before the first file is written: a failure leaves no label map without its report
    result = segmenter.segment(image, classes, progress=_window_progress(path.name, segmenter.config, image.shape))
    multi = None
    if pipe is not None:
        # every class goes in; multiclass.refine_classes' one rule picks those it refines
        try:
            multi = pipe.refine_classes(image, dict(zip(classes.classes, result.probs)), g4seg_config)
        except G4SegError as exc:  # name the classes: the flow's message speaks of "the mask"
            raise G4SegError(f"--refine of {', '.join(classes.classes)}: {exc}") from None
    # one image's files are whole or absent (FileSet): the report is staged last
    with FileSet() as staged:
        outputs = write_segmentation(out_dir, path.stem, image, {"labels": result.labels, "probs": result.probs,
                                                                 "names": result.names}, file_names, title,
                                     staged.stage)
        report = {"image": str(path), "parameters": segmenter.config.to_dict(), **models, **result.summary(),
                  "outputs": outputs, "rerun_key": key}
        if random:
            report["note"] = "random weights: these masks are meaningless (installation check only)"
        if multi is not None:
            labels, refined_probs = multi.labels, np.stack(list(multi.probs.values()))
            report["refine"] = {"parameters": g4seg_config.to_dict(), "refined_classes": list(multi.results),
                                "outputs": write_segmentation(out_dir / "refined", path.stem, image,
                                                              {"labels": labels, "probs": refined_probs,
                                                               "names": result.names}, file_names,
                                                              title or "G4Seg-refined", staged.stage)}
        report["seconds"] = round(time.perf_counter() - start, 3)
        atomic_write_text(staged.stage(report_file(out_dir, path.stem)), json.dumps(report, indent=2))
    return report
