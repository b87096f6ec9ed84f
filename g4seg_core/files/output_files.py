"""Output files: written atomically, into output folders checked before any work starts.

Every file the CLI and ``g4seg eval`` write goes through ``atomic_path``: it is written to a
hidden temporary file in the same folder and renamed over the target only when complete, so
an interrupt (Ctrl-C, kill, full disk) leaves either the previous good file or none, never a
truncated one. ``prepare_output_dir`` creates and probes an output folder up front, so an
unwritable ``--out`` is a one-line error before any model loads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from ..errors import G4SegError

PathLike = Union[str, "os.PathLike[str]"]


def os_error_message(exc: OSError, what: str = "") -> str:
    """One line naming the path(s) and the reason of an OSError (no traceback)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) for p in paths)
    prefix = f"{what} " if what else ""
    return f"{prefix}{where}: {reason}" if where else f"{prefix}{reason}".strip()


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` when the block succeeds.

    The temporary name keeps the extension (writers that pick the format from it still work)
    and starts with a dot (folder globs skip it). On any failure, KeyboardInterrupt included,
    the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class FileSet:
    """The files of one result (one image's outputs), written whole or not at all.

        with FileSet() as files:
            save_binary_png(mask, files.stage(out / "x_mask.png"))
            atomic_write_text(files.stage(out / "x_report.json"), ...)   # staged last: renamed last

    Each file is written to a hidden temporary name next to its target; when the block succeeds, every
    target is checked (none may be a folder) and the temporaries are renamed into place in the order they
    were staged. A failure while writing (full disk, Ctrl-C) removes the temporaries and leaves the earlier
    files as they were; a failure while renaming removes every target of the set, so no mix of old and new
    files (nor an old report vouching for them) stays.
    """

    def __init__(self) -> None:
        self.staged: List[Tuple[Path, Path]] = []  # (temporary, target)

    def stage(self, target: PathLike) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.stem}.part{os.getpid()}{target.suffix}")
        self.staged.append((tmp, target))
        return tmp

    def __enter__(self) -> "FileSet":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self._remove(tmp for tmp, _ in self.staged)
            return
        try:
            for _, target in self.staged:
                if target.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "is a folder, so the output cannot be written there; "
                                                          "move it away", str(target))
        except BaseException:
            self._remove(tmp for tmp, _ in self.staged)
            raise
        try:
            for tmp, target in self.staged:
                os.replace(tmp, target)
        except BaseException:
            self._remove([tmp for tmp, _ in self.staged] + [target for _, target in self.staged])
            raise

    @staticmethod
    def _remove(paths: Iterable[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                if not path.is_dir():
                    path.unlink()


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_image(image, path: PathLike, format: str = "PNG", **params) -> Path:
    """Save a PIL image atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format=format, **params)
    return Path(path)


def prepare_output_dir(path: PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (with parents) and check that files can be written into it.

    Raises G4SegError with one line naming the folder and the reason: it names an existing
    file, a parent is a file, permission denied, read-only file system, ...
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise G4SegError(f"{flag} {out} is an existing file, not a folder: give a folder "
                         f"(it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise G4SegError(f"{flag} {out}: cannot create the folder ({os_error_message(exc)})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".g4seg-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise G4SegError(f"{flag} {out}: cannot write into the folder ({exc.strerror or exc}); "
                         f"choose a folder you can write to") from None
    return out


def prepare_output_file(path: PathLike, flag: str) -> Path:
    """Check before any work that ``path`` can be written: not a folder, its folder writable (created)."""
    out = Path(path)
    if out.is_dir():
        raise G4SegError(f"{flag} {out} is a folder: give a file name, e.g. {out / 'bench.json'}")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise G4SegError(f"{flag} {out}: {blocking} is a file, so nothing can be written under it; "
                         "choose a path in a folder")
    prepare_output_dir(out.parent, flag=f"{flag} {out}: folder")
    return out


def _same_folder(a: Path, b: Path) -> bool:
    """True if two paths name one folder (symlinks, '.', '..', hard-linked mounts)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def refuse_overwriting_inputs(out_dir: PathLike, planned: List[Tuple[Path, str]], inputs: Iterable[PathLike] = (),
                              input_folders: Optional[Dict[str, PathLike]] = None, flag: str = "--out") -> None:
    """Refuse, before any work, a run that would write over what the user gave or over its own outputs.

    planned: (file, what writes it) for every file the run may write ("the label map of x_cat.png");
    inputs: every file the run reads; input_folders: {"the image folder IMAGE": folder} for folder inputs,
    which an output folder may not be (the next run would read the outputs as inputs).
    """
    out = Path(out_dir)
    for what, folder in (input_folders or {}).items():
        if _same_folder(out, Path(folder)):
            raise G4SegError(f"{flag} {out} is {what}: the outputs would replace or mix with the inputs "
                             f"(the next run would read them as inputs); give another folder")
    by_name: Dict[str, List[str]] = {}
    for path, what in planned:
        by_name.setdefault(os.path.normcase(os.path.abspath(path)), []).append(what)
    clashes = {name: whats for name, whats in by_name.items() if len(whats) > 1}
    if clashes:
        name, whats = next(iter(clashes.items()))
        more = f" (and {len(clashes) - 1} more name(s))" if len(clashes) > 1 else ""
        raise G4SegError(f"two outputs of this run would share the file {name}: {' and '.join(whats[:2])}{more}; "
                         "rename one of the inputs (or the class) so that every output has its own name")
    read = {}
    for p in inputs:
        try:
            st = os.stat(p)
        except OSError:
            continue
        read[(st.st_dev, st.st_ino)] = Path(p)
    if not read:
        return
    for path, what in planned:
        try:
            st = os.stat(path)
        except OSError:
            continue  # not there yet: writing it replaces nothing
        if (st.st_dev, st.st_ino) in read:
            raise G4SegError(f"{flag} {out}: {what} would be written over the input {read[(st.st_dev, st.st_ino)]}; "
                             "give another output folder")
