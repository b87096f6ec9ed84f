"""Picture files: the one reader behind every image the CLI, ``g4seg eval`` and the nodes open.

* ``open_image``: check the path is a regular file (a FIFO would block forever), open and
  decode it fully; any failure is one G4SegError line naming the path.
* ``file_size_hw``: (height, width) from the file header only, for checks before any model loads.
* ``read_rgb``: a photo as uint8 RGB [H, W, 3] with deep pixels scaled correctly: 16-bit
  (``I;16``, 48-bit PNG, uint16 ``.npy``) by 255/65535, 32-bit integer ``I`` images holding
  0..65535 likewise, float ``F`` images and float ``.npy`` holding [0, 1] by 255. Anything else
  is refused with the reason (PIL's own ``convert("RGB")`` clips 16-bit values at 255 and
  gives a white picture). Mask and label-map files (``mask_files``) use ``open_image`` too.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import G4SegError
from .output_files import os_error_message

PathLike = Union[str, "os.PathLike[str]"]

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")  # what folder inputs pick up
MASK_EXTS = (".png", ".npy", ".bmp", ".tif", ".tiff")
_OPEN_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_regular_file(path: PathLike, what: str = "image") -> str:
    """The path as a string if it names an existing regular file; else G4SegError saying what it is."""
    path = os.fspath(path)
    a_what = f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        where = "" if os.path.isabs(path) else f" (relative paths are taken from the current directory {os.getcwd()!r})"
        raise G4SegError(f"{what} file not found: {path!r}; check the path{where}") from None
    except OSError as exc:
        raise G4SegError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise G4SegError(f"{path!r} is a folder, not {a_what} file; give the path of a file")
    if not stat.S_ISREG(mode):
        raise G4SegError(f"{path!r} is not a regular file (a pipe, socket or device); give {a_what} file")
    return path


def open_image(path: PathLike, what: str = "image", hint: str = "") -> Image.Image:
    """Open and fully decode an image file (truncated or corrupt files fail here, not later)."""
    path = check_regular_file(path, what)
    try:
        img = Image.open(path)
        img.load()
    except _OPEN_ERRORS as exc:
        raise G4SegError(f"cannot read {what} {path!r} ({exc}){'; ' + hint if hint else ''}") from None
    return img


def load_npy(path: PathLike, what: str = "array") -> np.ndarray:
    """One array from a .npy file (never unpickles)."""
    path = check_regular_file(path, what)
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise G4SegError(f"cannot read {what} {path!r} as a .npy array ({exc}); save it with "
                         f"numpy.save(path, array) (no pickled objects)") from None
    if not isinstance(arr, np.ndarray):  # .npz
        raise G4SegError(f"{path!r} holds several arrays (.npz); save one array with numpy.save")
    return arr


def file_size_hw(path: PathLike, what: str = "image") -> Tuple[int, int]:
    """(height, width) of an image or .npy file from its header, without decoding the pixels."""
    path = check_regular_file(path, what)
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise G4SegError(f"cannot read {what} {path!r} as a .npy array ({exc})") from None
        if arr.ndim < 2:
            raise G4SegError(f"{what} {path!r} has shape {arr.shape}; an [H, W] or [H, W, C] array is needed")
        return int(arr.shape[0]), int(arr.shape[1])
    width, height = _header(path, what).size
    return int(height), int(width)


def file_mode(path: PathLike, what: str = "image") -> str:
    """PIL mode of an image file ("P", "L", "RGB", ...) from its header, without decoding the pixels."""
    return _header(check_regular_file(path, what), what).mode


def _header(path: str, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img
    except _OPEN_ERRORS as exc:
        raise G4SegError(f"cannot read {what} {path!r} ({exc})") from None


@dataclass
class RGBPicture:
    pixels: np.ndarray  # uint8 [H, W, 3]
    source: str  # what the file held, e.g. "RGB", "16-bit greyscale (I;16)"
    channels_converted: bool  # greyscale / alpha / palette / ... became RGB
    note: Optional[str]  # what was done to the pixels, None for plain 8-bit RGB


def _scaled(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.round(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _deep_to_uint8(values: np.ndarray, kind: str, name: str) -> Tuple[np.ndarray, str]:
    """16-bit, 32-bit integer or float pixels -> uint8, or a G4SegError naming the fix."""
    if kind == "uint16":
        return _scaled(values, 65535.0), "16-bit, scaled to 8 bits (x 255/65535)"
    if kind == "int":
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise G4SegError(f"{name} is a 32-bit integer image with values in [{lo}, {hi}]; only 0..65535 "
                             f"(16-bit) can be scaled to 8 bits: save it as an 8- or 16-bit PNG")
        return _scaled(values, 65535.0), "32-bit integer (read as 16-bit 0..65535), scaled to 8 bits"
    if kind == "float":
        if not np.isfinite(values).all():
            raise G4SegError(f"{name} is a float image with NaN or infinite values; save it as an 8- or "
                             f"16-bit PNG")
        lo, hi = float(values.min()), float(values.max())
        if lo < 0.0 or hi > 1.0:
            raise G4SegError(f"{name} is a float image with values in [{lo:g}, {hi:g}]; float pictures must "
                             f"hold 0..1: rescale it to [0, 1], or save it as an 8- or 16-bit PNG")
        return _scaled(values, 1.0), "float 0..1, scaled to 8 bits (x 255)"
    return values.astype(np.uint8), ""


def _array_kind(arr: np.ndarray, name: str) -> str:
    if arr.dtype == np.uint8:
        return "uint8"
    if arr.dtype == np.uint16:
        return "uint16"
    if np.issubdtype(arr.dtype, np.integer):
        return "int"
    if np.issubdtype(arr.dtype, np.floating):
        return "float"
    raise G4SegError(f"{name} has dtype {arr.dtype}; a picture needs uint8, uint16 or float 0..1 values")


def _array_picture(arr: np.ndarray, name: str) -> RGBPicture:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or arr.size == 0:
        raise G4SegError(f"{name} has shape {arr.shape}; a picture is [H, W] (greyscale) or [H, W, 3] (RGB)")
    kind = _array_kind(arr, name)
    pixels, how = _deep_to_uint8(arr, kind, name)
    layout = "greyscale" if arr.ndim == 2 else ("RGB" if arr.shape[-1] == 3 else "RGBA")
    if layout == "greyscale":
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    elif layout == "RGBA":
        pixels = pixels[..., :3]
    source = f"{arr.dtype} {layout} array"
    steps = [s for s in (how, {"greyscale": "repeated to RGB", "RGBA": "alpha dropped"}.get(layout)) if s]
    return RGBPicture(np.ascontiguousarray(pixels), source, layout != "RGB", "; ".join(steps) or None)


def picture_from_image(img: Image.Image, name: str = "image") -> RGBPicture:
    """A decoded PIL image as 8-bit RGB (see the module docstring for the modes)."""
    mode = img.mode
    if mode == "RGB":
        return RGBPicture(np.array(img), "RGB", False, None)  # a writable copy
    if mode in SIXTEEN_BIT_MODES or mode in ("I", "F"):
        kind = {"I": "int", "F": "float"}.get(mode, "uint16")
        grey, how = _deep_to_uint8(np.asarray(img), kind, name)
        label = {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")
        return RGBPicture(np.repeat(grey[..., None], 3, axis=-1), f"{label} greyscale ({mode})", True,
                          f"{how}; repeated to RGB")
    try:
        rgb = np.array(img.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise G4SegError(f"{name} has image mode {mode!r}, which cannot be converted to RGB ({exc}); "
                         f"save it as an RGB PNG or JPEG") from None
    what = {"L": "8-bit greyscale (L)", "LA": "greyscale with alpha (LA)", "1": "1-bit (1)",
            "P": "palette (P)", "PA": "palette with alpha (PA)", "RGBA": "RGBA", "CMYK": "CMYK"}.get(mode, mode)
    drop = " (alpha dropped)" if "A" in mode else ""
    return RGBPicture(rgb, what, True, f"converted from {mode} to RGB{drop}")


_ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "upside down, mirrored", 5: "rotated and mirrored",
                 6: "rotated 90° clockwise", 7: "rotated and mirrored", 8: "rotated 90° counter-clockwise"}


def stored_as_shown_notes(img: Image.Image) -> List[str]:
    """What a viewer shows differently from the pixels read (the first frame, as stored): other frames of an
    animation or multi-page file, an EXIF orientation. Said, never silently applied or dropped."""
    notes = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"the first of its {frames} frames is read")
    orientation = img.getexif().get(0x0112, 1)
    if orientation in _ORIENTATIONS:
        notes.append(f"EXIF orientation {orientation}: viewers show it {_ORIENTATIONS[orientation]}, its pixels "
                     "are read as stored (the outputs follow them; a mask drawn on the turned view does not: turn "
                     "the file's pixels first, e.g. PIL.ImageOps.exif_transpose or exiftran -a)")
    return notes


def read_rgb(path: PathLike, what: str = "image") -> RGBPicture:
    """Read a picture file (any PIL image, or .npy) as uint8 RGB; see the module docstring."""
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        return _array_picture(load_npy(path, what), f"{what} {path!r}")
    img = open_image(path, what)
    picture = picture_from_image(img, f"{what} {path!r}")
    notes = stored_as_shown_notes(img)
    if notes:
        picture.note = "; ".join(([picture.note] if picture.note else []) + notes)
    return picture


def files_by_stem(folder: Path, exts, what: str, output_example: str) -> Dict[str, Path]:
    """{stem: file} of the `exts` files in a folder (dotfiles skipped); two files with one stem are an
    error: the outputs are named by stem (`output_example`, e.g. STEM_refined_mask.png) and would
    overwrite each other."""
    found: Dict[str, List[Path]] = {}
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise G4SegError(f"cannot list {what} folder {os_error_message(exc)}") from None
    for p in entries:
        if p.suffix.lower() in exts and not p.name.startswith("."):
            found.setdefault(p.stem, []).append(p)
    clashes = {stem: ps for stem, ps in found.items() if len(ps) > 1}
    if clashes:
        shown = "; ".join(" and ".join(p.name for p in ps) for ps in list(clashes.values())[:5])
        raise G4SegError(f"{len(clashes)} name(s) in {what} folder {folder} are used by several files ({shown}): "
                         f"the outputs are named by stem ({output_example} ...); rename or move one of each")
    return {stem: ps[0] for stem, ps in found.items()}
