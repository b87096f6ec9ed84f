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
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

from ..errors import G4SegError
from ..files.image_files import IMAGE_EXTS
from ..files.output_files import atomic_write_text, os_error_message

Item = TypeVar("Item")

# What a folder of images is read as: every picture file, and .npy arrays, which a single IMAGE may be too.
FOLDER_IMAGE_EXTS = IMAGE_EXTS + (".npy",)


def item_error(exc: BaseException) -> str:
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)


def _some(names: List[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


class FolderRun:
    def __init__(self, command: str, folder: bool, rerun_hint: str = "rerun with --skip-existing to do just those"):
        self.command = command
        self.folder = folder
        self.rerun_hint = rerun_hint
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

    def finish(self, report: Optional[Path] = None) -> int:
        """Write the run report (a folder run), print the counts and the failures; the exit status."""
        if self.folder:
            if report is not None:
                atomic_write_text(report, json.dumps(self.summary(), indent=2))
            print(f"g4seg {self.command}: {self.total} image(s): {len(self.done)} done, {len(self.skipped)} skipped, "
                  f"{len(self.failed)} failed" + (f" -> {report}" if report is not None else ""), file=sys.stderr)
        self.print_failures()
        return 1 if self.failed else 0

    def print_failures(self) -> None:
        if self.failed:
            print(f"{len(self.failed)} image(s) failed (fix them and {self.rerun_hint}):", file=sys.stderr)
            for name, error in sorted(self.failed.items()):
                print(f"  {name}: {error}", file=sys.stderr)
