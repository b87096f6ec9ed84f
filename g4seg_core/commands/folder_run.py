"""One way to run a command over many items (images, dataset ids), shared by refine, segment and eval.

    run = FolderRun("refine", folder=True)
    todo = run.check(items, name_of, check, finished=..., has_outputs=...)   # before any model loads
    if todo: load the models; run.each(todo, name_of, work)
    return run.finish(OUT / "g4seg_run.json")

- every item is checked (decoded, sizes compared ...) before any model loads; a bad item is skipped,
  remembered with a one-line reason and listed at the end while the rest go on;
- a single item (not a folder) fails the command at once instead (exit 2 through main);
- G4SegError and OSError of one item (a file that cannot be written, a name too long) are that item's
  failure; anything else is a bug and is raised;
- the run summary counts every item once: done + skipped + failed = all;
- exit status: 0 all done or skipped, 1 some failed (listed); main adds 2 (error) and 130 (Ctrl-C).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

from ..errors import G4SegError
from ..files.image_files import IMAGE_EXTS
from ..files.output_files import atomic_write_text, os_error_message

Item = TypeVar("Item")

# What a folder of images is read as: every picture file, and .npy arrays, which a single IMAGE may be too.
FOLDER_IMAGE_EXTS = IMAGE_EXTS + (".npy",)


def item_error(exc: BaseException) -> str:
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)


# ---- scale-out: torchrun / accelerate start one process per GPU and set RANK and WORLD_SIZE -------------
def shard_from_env(env=None) -> Optional[Tuple[int, int]]:
    """(this process's index, number of processes) under torchrun / accelerate, else None."""
    env = os.environ if env is None else env
    for rk, ws in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE")):
        if env.get(rk, "").strip() and env.get(ws, "").strip():
            try:
                return int(env[rk]), int(env[ws])
            except ValueError:
                pass
    return None


def device_for_rank(args) -> None:
    """Under torchrun without --device: each process on its own GPU (cuda:LOCAL_RANK)."""
    if getattr(args, "device", None) or not os.environ.get("LOCAL_RANK", "").strip():
        return
    import torch

    if torch.cuda.is_available():
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"


def _some(names: List[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


class FolderRun:
    """report: the run report of a folder run (None: none is written). shard: (index, count) when the run is
    split over processes (torchrun / accelerate, or RANK and WORLD_SIZE set by hand): each takes every
    count-th item, writes REPORT.rank<index>.json, and process 0 merges them into the one run report."""

    def __init__(self, command: str, folder: bool, rerun_hint: str = "rerun with --skip-existing to do just those",
                 report: Optional[Path] = None, shard: Optional[Tuple[int, int]] = None):
        self.command = command
        self.folder = folder
        self.rerun_hint = rerun_hint
        self.report = report if folder else None
        self.index, self.count = shard if shard is not None else (0, 1)
        if self.count < 1 or not 0 <= self.index < self.count:
            raise G4SegError(f"process {self.index} of {self.count}: RANK must be 0..WORLD_SIZE-1")
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID")  # set by torchrun (and accelerate launch)
        if self.report is not None and self.count > 1:
            self._rank_report(self.index).unlink(missing_ok=True)  # this process's report of an earlier run
        self.done: List[str] = []
        self.skipped: List[str] = []
        self.failed: Dict[str, str] = {}
        self.overwriting: List[str] = []

    # -- bookkeeping
    def fail(self, name: str, exc: BaseException) -> None:
        """Record one item's failure; a single-item run stops here (main prints it, exit 2)."""
        if not self.folder:
            raise exc
        self.failed[name] = item_error(exc)

    def fail_all(self, failures: Dict[str, str]) -> None:
        """Items that failed before they could be checked (an image without a mask ...)."""
        self.failed.update(failures)

    @property
    def total(self) -> int:
        return len(set(self.done) | set(self.skipped) | set(self.failed))

    def _rank_report(self, index: int) -> Path:
        return self.report.with_name(f"{self.report.stem}.rank{index}{self.report.suffix}")

    def my_share(self, items: List[Item]) -> List[Item]:
        """This process's items: every count-th one (all of them when the run is not split)."""
        if self.count > 1:
            print(f"g4seg {self.command}: process {self.index} of {self.count}: {len(items[self.index::self.count])} "
                  f"of {len(items)} image(s)", file=sys.stderr)
        return list(items[self.index::self.count])

    # -- the two passes
    def check(self, items: Iterable[Item], name_of: Callable[[Item], str], check: Callable[[Item], object],
              finished: Optional[Callable[[Item], bool]] = None,
              has_outputs: Optional[Callable[[Item], bool]] = None) -> List[Item]:
        """Every item checked before any work: those finished before (--skip-existing) are skipped, bad ones
        recorded; returns the items to do. Says what was skipped, failed and will be overwritten."""
        todo = []
        for item in items:
            name = name_of(item)
            if finished is not None and finished(item):
                self.skipped.append(name)
                continue
            try:
                check(item)
            except (G4SegError, OSError) as exc:
                self.fail(name, exc)
                continue
            todo.append(item)
            if has_outputs is not None and has_outputs(item):
                self.overwriting.append(name)
        if self.skipped:
            print(f"skipping {len(self.skipped)} image(s) done before with these parameters and models "
                  f"(--skip-existing): {_some(self.skipped)}", file=sys.stderr)
        if self.overwriting:
            print(f"note: overwriting the earlier outputs of {len(self.overwriting)} image(s) "
                  f"({_some(self.overwriting)}); --skip-existing keeps finished ones", file=sys.stderr)
        if self.failed:
            print(f"{len(self.failed)} image(s) fail the checks and are skipped (listed at the end)", file=sys.stderr)
        return todo

    def each(self, todo: List[Item], name_of: Callable[[Item], str], work: Callable[[Item], Optional[str]],
             progress=None) -> None:
        """work(item) for every item, with a progress bar; its returned line is printed. One item's failure
        is recorded and the run goes on (a single item: raised)."""
        from tqdm import tqdm

        bar = progress if progress is not None else tqdm(total=len(todo), desc=f"g4seg {self.command}",
                                                         unit="image", disable=len(todo) <= 1)
        try:
            for item in todo:
                name = name_of(item)
                try:
                    line = work(item)
                except (G4SegError, OSError) as exc:
                    self.fail(name, exc)
                    bar.write(f"{name}: failed, going on: {self.failed[name]}", file=sys.stderr)
                else:
                    self.done.append(name)
                    if line:
                        bar.write(line)
                bar.update(1)
        finally:
            bar.close()

    # -- the end
    def summary(self) -> dict:
        return {"command": self.command, "images": self.total, "done": self.done, "skipped": self.skipped,
                "failed": [{"image": k, "error": v} for k, v in sorted(self.failed.items())]}

    def finish(self) -> int:
        """Write the run report (a folder run), print the counts and the failures; the exit status. A split run:
        each process writes its own report; process 0 waits for the others' (under torchrun) and merges them."""
        report = self.report
        if self.folder:
            if report is not None and self.count > 1:
                atomic_write_text(self._rank_report(self.index), json.dumps({**self.summary(), "run_id": self.run_id,
                                                                             "process": self.index}, indent=2))
            elif report is not None:
                atomic_write_text(report, json.dumps(self.summary(), indent=2))
            where = self._rank_report(self.index) if report is not None and self.count > 1 else report
            print(f"g4seg {self.command}: {self.total} image(s): {len(self.done)} done, {len(self.skipped)} skipped, "
                  f"{len(self.failed)} failed" + (f" -> {where}" if where is not None else ""), file=sys.stderr)
        self.print_failures()
        status = 1 if self.failed else 0
        if report is not None and self.count > 1 and self.index == 0:
            status = max(status, self._merge(report))
        return status

    def _merge(self, report: Path) -> int:
        """Process 0: the reports of every process into the one run report (waits for them under torchrun)."""
        deadline = time.monotonic() + (86400.0 if self.run_id else 0.0)
        while True:
            parts, missing = [], []
            for i in range(self.count):
                try:
                    part = json.loads(self._rank_report(i).read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    part = None
                if not isinstance(part, dict) or part.get("run_id") != self.run_id:
                    missing.append(i)
                else:
                    parts.append(part)
            if not missing:
                break
            if time.monotonic() >= deadline:
                print(f"g4seg {self.command}: processes {missing} have not finished; their images are not in "
                      f"{report} yet (rerun process 0 when they have)", file=sys.stderr)
                return 0
            time.sleep(2.0)
        merged = {"command": self.command, "processes": self.count,
                  "images": sum(int(p.get("images", 0)) for p in parts)}
        for key in ("done", "skipped", "failed"):
            merged[key] = [x for p in parts for x in p.get(key, [])]
        atomic_write_text(report, json.dumps(merged, indent=2))
        print(f"g4seg {self.command}: all {self.count} processes: {merged['images']} image(s): "
              f"{len(merged['done'])} done, {len(merged['skipped'])} skipped, {len(merged['failed'])} failed "
              f"-> {report}", file=sys.stderr)
        return 1 if merged["failed"] else 0

    def print_failures(self) -> None:
        if self.failed:
            print(f"{len(self.failed)} image(s) failed (fix them and {self.rerun_hint}):", file=sys.stderr)
            for name, error in sorted(self.failed.items()):
                print(f"  {name}: {error}", file=sys.stderr)
