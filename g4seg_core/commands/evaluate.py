"""`g4seg eval` and `g4seg eval-merge` (wired into g4seg_core/commands/main.py by add_eval_parser).

    g4seg eval VOC_ROOT --protocol perturb-0.8 --methods none,densecrf,g4seg,g4seg+densecrf --out runs/p08
    g4seg eval VOC_ROOT --split val --coarse clip_es_cams/ --out runs/clipes
    torchrun --nproc_per_node=4 -m g4seg_core.commands.main eval VOC_ROOT ... --out runs/x   (one shard per rank)
    g4seg eval --merge runs/x          (or: g4seg eval-merge runs/x)

See docs/EVALUATION.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import G4SegError
from .folder_run import FolderRun, device_for_rank, shard_from_env
from ..files.output_files import atomic_write_text, os_error_message, prepare_output_dir
from ..evaluation.runner import (
    JsonlWriter,
    dedupe,
    evaluate_image,
    load_records,
    results_files,
    score,
    fuse,
    summarize,
    timing,
    warn_damaged,
)

DEFAULT_METHODS = "none,g4seg"
FINGERPRINT_KEYS = ("root", "split", "coarse", "protocol", "seed", "num_classes", "ignore_index",
                    "classes_from", "class_names")


# ----------------------------------------------------------------------------- parser

def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` (and `eval-merge`) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="score refiners on a VOC-style dataset (mIoU, Boundary IoU, mBA, Table VII buckets)",
        description="Refine every class of every image with each of --methods, fuse, and score against the "
                    "ground truth. Results are appended to OUT/results*.jsonl as they finish (an "
                    "interrupted run resumes), then OUT/summary.json, summary.csv, report.html, grid.png.")
    p.add_argument("data", nargs="?", help="VOC-style folder: JPEGImages/, SegmentationClass/, "
                                           "optional ImageSets/Segmentation/<split>.txt")
    p.add_argument("--out", help="output folder (results, summary, report)")
    p.add_argument("--merge", metavar="DIR", help="only merge the results*.jsonl of DIR (all shards) "
                                                  "and write the summary and report")
    g = p.add_argument_group("data")
    g.add_argument("--split", help="split name (ImageSets/Segmentation/<split>.txt) or a .txt of ids "
                                   "(default: every label map in SegmentationClass/)")
    g.add_argument("--images-dir", default="JPEGImages")
    g.add_argument("--gt-dir", default="SegmentationClass")
    g.add_argument("--coarse", help="coarse masks: <id>.png label maps or <id>_<class>.png probability maps")
    g.add_argument("--protocol", help="synthetic coarse masks from the ground truth: perturb-0.9/0.8/0.7, "
                                      "dilate-5/10/20, erode-5/10/20, lowres-8/16 (seeded by --seed)")
    g.add_argument("--num-classes", type=int, default=21)
    g.add_argument("--ignore-index", type=int, default=255)
    g.add_argument("--class-names", help="text file, one class name per line, background first (default: VOC)")
    g.add_argument("--classes", dest="classes_from", choices=("coarse", "gt"), default="coarse",
                   help="which classes to refine per image: those in the coarse input (default) or "
                        "those in the ground truth (image-level labels, the WSSS setting)")
    g.add_argument("--limit", type=int, help="only the first N ids (quick runs)")
    g = p.add_argument_group("methods and metrics")
    g.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: none, densecrf, morphology, guided, g4seg, g4seg+densecrf "
                        f"(any a+b chains) (default {DEFAULT_METHODS})")
    g.add_argument("--boundary-ratio", type=float, default=0.02, help="Boundary IoU band / image diagonal")
    g.add_argument("--report-method", help="method shown in the example grid (default: first that is not none)")
    g.add_argument("--no-save-pred", action="store_true", help="do not write OUT/pred/<method>/<id>.png "
                                                               "(the example grid needs them)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--overwrite", action="store_true", help="start over: delete earlier results in OUT")
    g = p.add_argument_group("scale-out (torchrun / accelerate set RANK and WORLD_SIZE)")
    g.add_argument("--shard-index", type=int, help="this process's shard (default: $RANK, else 0)")
    g.add_argument("--num-shards", type=int, help="number of shards (default: $WORLD_SIZE, else 1)")
    g.add_argument("--merge-wait", type=float,
                   help="shard 0 waits up to this many seconds for the other shards, then merges "
                        "(default: 86400 under torchrun/accelerate, 0 with explicit --shard-index)")
    from .options import add_config_arguments, add_model_arguments

    add_config_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=run_eval)

    m = subparsers.add_parser("eval-merge", help="merge the shards of a `g4seg eval` output folder")
    m.add_argument("merge", metavar="DIR")
    m.add_argument("--report-method")
    m.set_defaults(func=run_merge)
    return p


# ----------------------------------------------------------------------------- helpers

def resolve_shard(args) -> Tuple[int, int, bool]:
    """(index, count, from_env)."""
    env = shard_from_env()
    from_env = args.shard_index is None and args.num_shards is None and env is not None
    if from_env:
        index, count = env
    else:
        index = args.shard_index if args.shard_index is not None else 0
        count = args.num_shards if args.num_shards is not None else 1
    if count < 1 or not 0 <= index < count:
        raise G4SegError(f"shard {index} of {count}: use 0 <= --shard-index < --num-shards")
    return index, count, from_env


def results_name(index: int, count: int) -> str:
    return "results.jsonl" if count == 1 else f"results.rank{index}.jsonl"


def _methods(text: str) -> List[str]:
    from ..evaluation.baselines import BASE_REFINERS

    methods = []
    for m in str(text).split(","):
        m = m.strip().lower().replace(" ", "")
        if m and m not in methods:
            for part in m.split("+"):
                if part not in BASE_REFINERS:
                    raise G4SegError(f"unknown method {part!r} in --methods: choose from "
                                     f"{', '.join(BASE_REFINERS)}, or chain them with '+' (g4seg+densecrf)")
            methods.append(m)
    if not methods:
        raise G4SegError("--methods is empty: e.g. --methods none,g4seg")
    return methods


def _fingerprint(run: dict) -> dict:
    ds = run.get("dataset", {})
    fp = {k: ds.get(k) for k in FINGERPRINT_KEYS}
    fp.update({k: run.get(k) for k in ("bg_power", "boundary_ratio")})
    cfg = dict(run.get("config") or {})
    for k in ("device", "dtype"):
        cfg.pop(k, None)
    fp["config"] = cfg
    return fp


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_label_map(path: Path, labels) -> None:
    from ..files.mask_files import save_label_map_png

    save_label_map_png(labels, str(path))  # atomic


def failures_name(index: int, count: int) -> str:
    return "failures.json" if count == 1 else f"failures.rank{index}.json"


def read_run(out_dir: Path) -> dict:
    run_path = out_dir / "run.json"
    try:
        run = json.loads(run_path.read_text(encoding="utf-8"))
        missing = [k for k in ("num_classes", "ignore_index", "class_names") if k not in run["dataset"]]
        if missing:
            raise KeyError(missing[0])
    except OSError as exc:
        raise G4SegError(f"cannot read {os_error_message(exc)}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise G4SegError(f"{run_path} is damaged ({type(exc).__name__}: {exc}); use --overwrite to start "
                         "the run over") from None
    return run


def read_failures(out_dir: Path, records: List[dict], methods: List[str]) -> List[dict]:
    """Failures of every shard's latest run, minus images that have since been done."""
    done: dict = {}
    for r in records:
        done.setdefault(r["id"], set()).add(r["method"])
    out = []
    for path in sorted(out_dir.glob("failures*.json")):
        try:
            items = json.loads(path.read_text(encoding="utf-8"))["failures"]
            items = [{"id": str(f["id"]), "error": str(f["error"])} for f in items]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"warning: ignoring unreadable {path.name} ({exc})", file=sys.stderr)
            continue
        out += [f for f in items if not set(methods) <= done.get(f["id"], set())]
    return sorted(out, key=lambda f: f["id"])


class NoResults(G4SegError):
    """The folder holds no result to summarise (every image failed, or none was evaluated yet)."""


def finish(out_dir: Path, report_method: Optional[str] = None) -> dict:
    """Recompute the totals from every results*.jsonl in out_dir; write summary + report."""
    from ..evaluation.report import make_grid, write_report_html, write_summary_csv, write_summary_json

    if not (out_dir / "run.json").is_file():
        raise G4SegError(f"{out_dir} has no run.json: is it the --out folder of a `g4seg eval` run?")
    run = read_run(out_dir)
    files = results_files(out_dir)
    ds = run["dataset"]
    records, damaged = load_records(files, ds["num_classes"], run.get("methods"))
    warn_damaged(damaged)
    records = dedupe(records)
    failures = read_failures(out_dir, records, run.get("methods") or [])
    if not records:
        raise NoResults(f"no results in {out_dir} (results*.jsonl are empty or missing)"
                         + (f"; {len(failures)} image(s) failed, e.g. {failures[0]['id']}: {failures[0]['error']}"
                            if failures else ""))
    methods = summarize(records, ds["num_classes"], ds["ignore_index"], ds["class_names"], run.get("methods"))
    grid_method = report_method or run.get("report_method") or next(
        (m for m in methods if m != "none"), next(iter(methods)))
    summary = {"run": run, "results_files": [f.name for f in files], "num_records": len(records),
               "methods": methods, "timing": timing(records), "grid_method": grid_method,
               "failures": failures, "damaged_lines": len(damaged)}
    grid = make_grid(out_dir, records, grid_method)
    summary["grid"] = grid.name if grid else None
    write_summary_json(out_dir, summary)
    write_summary_csv(out_dir, summary)
    write_report_html(out_dir, summary, grid)
    return summary


def print_summary(summary: dict, out=None) -> None:
    out = sys.stdout if out is None else out  # looked up at call time (captured streams)
    def f(v):
        return "   -  " if v is None else f"{v:6.2f}"

    print(f"{'method':<18} {'mIoU':>6} {'gain':>6} {'BIoU':>6} {'gain':>6} {'mBA':>6} {'gain':>6} "
          f"| gain by initial IoU 0-40 / 40-80 / 80-100 (samples)", file=out)
    for m, r in summary["methods"].items():
        bk = r["buckets"]
        buckets = " / ".join(f"{f(bk[b]['gain']).strip()} ({bk[b]['samples']})" for b in bk)
        print(f"{m:<18} {f(r['after']['miou'])} {f(r['gain']['miou'])} {f(r['after']['boundary_iou'])} "
              f"{f(r['gain']['boundary_iou'])} {f(r['after']['mba'])} {f(r['gain']['mba'])} | {buckets}", file=out)


# ----------------------------------------------------------------------------- commands

def run_merge(args) -> int:
    out_dir = Path(args.merge)
    if not out_dir.is_dir():
        raise G4SegError(f"--merge {out_dir}: no such folder")
    summary = finish(out_dir, getattr(args, "report_method", None))
    print_summary(summary)
    print(f"merged {summary['num_records']} result(s) from {', '.join(summary['results_files'])} "
          f"-> {out_dir / 'summary.json'}, {out_dir / 'report.html'}")
    return 0


def run_eval(args) -> int:
    if getattr(args, "merge", None):
        return run_merge(args)
    if not args.data:
        raise G4SegError("give the dataset folder: g4seg eval VOC_ROOT --protocol perturb-0.8 --out OUT "
                         "(or g4seg eval --merge OUT)")
    if not args.out:
        raise G4SegError("give an output folder with --out")
    if not 0 < args.boundary_ratio <= 1:  # NaN fails this too
        raise G4SegError(f"--boundary-ratio {args.boundary_ratio}: use a fraction of the image diagonal in (0, 1] "
                         "(default 0.02)")
    from ..evaluation.baselines import make_refiner, needs_crf, needs_pipeline
    from .options import build_pipeline, check_given_model_paths, config_from_args
    from ..evaluation.datasets import VOCStyleDataset, read_class_names

    index, count, from_env = resolve_shard(args)
    if from_env:
        device_for_rank(args)
    config = config_from_args(args)
    bg_power = float(config.bg_power)  # --bg-power is a config knob flag
    methods = _methods(args.methods)
    if any(needs_pipeline(m) for m in methods):
        check_given_model_paths(args)
    class_names = read_class_names(args.class_names) if args.class_names else None
    dataset = VOCStyleDataset(args.data, split=args.split, image_dir=args.images_dir, gt_dir=args.gt_dir,
                              coarse_dir=args.coarse, protocol=args.protocol, seed=config.seed,
                              num_classes=args.num_classes, class_names=class_names,
                              ignore_index=args.ignore_index, classes_from=args.classes_from,
                              limit=args.limit)
    _refuse_overwriting_inputs(args, dataset, index, count)
    out_dir = prepare_output_dir(args.out)
    run = {"dataset": dataset.describe(), "methods": methods, "config": config.to_dict(),
           "bg_power": bg_power, "boundary_ratio": args.boundary_ratio, "models": None,
           "report_method": args.report_method}
    run_path = out_dir / "run.json"
    if args.overwrite:
        # Each rank removes its own files; rank 0 also the files no current rank writes
        # (never another live rank's file: they may already be writing).
        own = {results_name(index, count), f"done.rank{index}.json", failures_name(index, count)}
        for f in results_files(out_dir) + list(out_dir.glob("done.rank*.json")) + list(out_dir.glob("failures*.json")):
            stem_rank = f.name.split(".rank")[1].split(".")[0] if ".rank" in f.name else None
            foreign_live = stem_rank is not None and stem_rank.isdigit() and int(stem_rank) < count
            if f.name in own or (index == 0 and not foreign_live):
                f.unlink(missing_ok=True)
    if run_path.exists() and not args.overwrite:
        old = read_run(out_dir)
        if _fingerprint(old) != _fingerprint(run):
            diff = sorted(k for k, v in _fingerprint(run).items() if _fingerprint(old).get(k) != v)
            raise G4SegError(f"{out_dir} holds results of a different run (differs in {', '.join(diff)}); "
                             "use another --out, or --overwrite to start over")
        run["methods"] = old.get("methods", []) + [m for m in methods if m not in old.get("methods", [])]
        if old.get("report_method") and not args.report_method:
            run["report_method"] = old["report_method"]
        run["models"] = old.get("models")

    # Resume: every valid (id, method) record is done; damaged lines are redone.
    own_results = out_dir / results_name(index, count)
    records, damaged = ([], []) if args.overwrite else load_records(
        results_files(out_dir), dataset.num_classes, run["methods"])
    warn_damaged(damaged)
    _set_aside_damaged(own_results, [d for d in damaged if d.path == own_results])
    done = {(r["id"], r["method"]) for r in records}
    my_ids = dataset.ids[index::count]
    todo = [sid for sid in my_ids if any((sid, m) not in done for m in methods)]
    if len(todo) < len(my_ids):
        print(f"resuming: {len(my_ids) - len(todo)} of {len(my_ids)} image(s) already done", file=sys.stderr)
    if count > 1:
        print(f"shard {index}/{count}: {len(my_ids)} image(s)", file=sys.stderr)

    # Cheap checks (file headers, sizes) of every image still to do, before any model loads;
    # a bad image is listed at the end and the run goes on without it (the one folder-run helper).
    run_items = FolderRun("eval", folder=True, rerun_hint="rerun the same command to evaluate just those")
    todo = run_items.check(todo, str, dataset.check)
    failures = run_items.failed  # id -> one-line error

    refiners: dict = {}
    if todo:
        if any(needs_crf(m) for m in methods):
            from ..evaluation.densecrf import crf_available, INSTALL_HINT

            if not crf_available():
                raise G4SegError(INSTALL_HINT)
        pipeline, models = None, "none (no g4seg method)"
        if any(needs_pipeline(m) for m in methods):
            pipeline, models = build_pipeline(args, config)
        run["models"] = models
        shared: dict = {}  # one g4seg instance for every chain: G4Seg runs once per (image, class)
        refiners = {m: make_refiner(m, pipeline=pipeline, config=config, shared=shared) for m in methods}
    _write_json(run_path, run)
    (out_dir / f"done.rank{index}.json").unlink(missing_ok=True)

    from tqdm import tqdm

    writer = JsonlWriter(own_results)
    save = not args.no_save_pred
    t_start = time.perf_counter()
    try:
        bar = tqdm(total=len(my_ids), initial=len(my_ids) - len(todo), unit="img",
                   desc=f"eval[{index}/{count}]" if count > 1 else "eval", disable=args.no_progress,
                   dynamic_ncols=True)
        run_items.each(todo, str, lambda sid: _evaluate_one(sid, dataset, methods, refiners, done, bg_power, args,
                                                            out_dir, writer, save), progress=bar)
    finally:
        writer.close()
        _write_json(out_dir / failures_name(index, count),
                    {"failures": [{"id": k, "error": v} for k, v in sorted(failures.items())]})
    elapsed = time.perf_counter() - t_start
    if todo:
        print(f"{len(todo)} image(s) in {elapsed:.1f} s ({len(todo) / max(elapsed, 1e-9):.2f} images/s)",
              file=sys.stderr)
    _write_json(out_dir / f"done.rank{index}.json", {"shard": index, "num_shards": count,
                                                     "images": len(my_ids)})

    if count > 1:
        wait = args.merge_wait if args.merge_wait is not None else (86400.0 if from_env else 0.0)
        if index != 0 or not _wait_for_shards(out_dir, count, wait):
            print(f"shard {index}/{count} done. When every shard has finished: g4seg eval --merge {out_dir}",
                  file=sys.stderr)
            print_failures([{"id": k, "error": v} for k, v in sorted(failures.items())],
                           where=failures_name(index, count))
            return 1 if failures else 0
    try:
        summary = finish(out_dir, args.report_method)
    except NoResults:
        if not failures:
            raise
        # every image of this run failed: the work was tried, so exit 1 like refine and segment (listed once)
        print_failures([{"id": k, "error": v} for k, v in sorted(failures.items())], where=failures_name(index, count))
        print(f"g4seg eval: no image could be evaluated, so no summary was written; {out_dir} holds "
              f"{failures_name(index, count)}", file=sys.stderr)
        return 1
    print_summary(summary)
    print(f"wrote {out_dir / 'summary.json'}, {out_dir / 'summary.csv'}, {out_dir / 'report.html'}")
    print_failures(summary["failures"])
    return 1 if summary["failures"] or failures else 0


def _refuse_overwriting_inputs(args, dataset, index: int, count: int) -> None:
    """--out may be none of the input folders, and none of its files may be an input (--config ...)."""
    from ..files.output_files import refuse_overwriting_inputs

    out = Path(args.out)
    names = ["run.json", results_name(index, count), failures_name(index, count), f"done.rank{index}.json",
             "summary.json", "summary.csv", "report.html", "grid.png", "damaged_lines.txt"]
    folders = {"the dataset folder (DATA)": dataset.root, "the image folder (--images-dir)": dataset.image_dir,
               "the ground-truth folder (--gt-dir)": dataset.gt_dir}
    if dataset.coarse_dir is not None:
        folders["the coarse-mask folder (--coarse)"] = dataset.coarse_dir
    inputs = [p for p in (args.config, args.class_names, args.split) if p]
    refuse_overwriting_inputs(out, [(out / n, n) for n in names], inputs, folders)


def print_failures(failures: List[dict], where: str = "summary.json") -> None:
    if failures:
        print(f"{len(failures)} image(s) failed (also in {where}; fix them and rerun the same command "
              "to evaluate just those):", file=sys.stderr)
        for f in failures:
            print(f"  {f['id']}: {f['error']}", file=sys.stderr)


def _evaluate_one(sid, dataset, methods, refiners, done, bg_power, args, out_dir, writer, save) -> None:
    from ..evaluation.report import pred_path

    sample = dataset.load(sid)
    pending = {m: refiners[m] for m in methods if (sid, m) not in done}
    hw = sample.gt.shape
    coarse_label = fuse(sample.coarse, hw, bg_power)
    before = score(coarse_label, sample.gt, dataset.num_classes, dataset.ignore_index, args.boundary_ratio)
    if save:
        _save_label_map(pred_path(out_dir, "coarse", sid), coarse_label)
    for name, record, label in evaluate_image(sample, pending, dataset.num_classes, dataset.ignore_index,
                                              bg_power, args.boundary_ratio, before=before):
        if save:
            _save_label_map(pred_path(out_dir, name, sid), label)
        writer.write(record)


def _set_aside_damaged(path: Path, damaged) -> None:
    """Move this shard's damaged lines out of its results file (into damaged_lines.txt) so a rerun
    does not warn about them again; the file is rewritten atomically."""
    if not damaged:
        return
    bad = {d.line for d in damaged}
    lines = path.read_bytes().split(b"\n")
    keep = [line for i, line in enumerate(lines[:-1], start=1) if i not in bad]
    with open(path.parent / "damaged_lines.txt", "ab") as fh:
        fh.write(b"".join(d.raw + b"\n" for d in damaged))
    from ..files.output_files import atomic_write_bytes

    atomic_write_bytes(path, b"".join(line + b"\n" for line in keep) + lines[-1])
    print(f"warning: moved {len(damaged)} damaged line(s) of {path.name} to damaged_lines.txt", file=sys.stderr)


def _wait_for_shards(out_dir: Path, count: int, wait: float) -> bool:
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        missing = [i for i in range(count) if not (out_dir / f"done.rank{i}.json").exists()]
        if not missing:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(2.0)
