"""Mask, probability and label-map files: reading (PNG 8/16-bit, float images, .npy) and writing.

Files are opened by image_files (the one reader) and written atomically (output_files).

A label map is uint8 [H, W] holding class indices, 255 = ignore.
"""

from __future__ import annotations

import json
import os
from typing import Union

import numpy as np
from PIL import Image

from ..errors import G4SegError
from .image_files import SIXTEEN_BIT_MODES, load_npy, open_image
from ..method.masks import as_numpy, validate_probability
from .output_files import save_image

PathLike = Union[str, "os.PathLike[str]"]


_MASK_HINT = "save the mask as a PNG (8- or 16-bit grayscale) or a .npy float array"


def _open_image(path: PathLike) -> Image.Image:
    return open_image(path, what="mask", hint=_MASK_HINT)


def _load_npy(path: PathLike) -> np.ndarray:
    return load_npy(path, what="mask")


def load_probability(path: PathLike) -> np.ndarray:
    """Load a coarse foreground map as float32 [H, W] in [0, 1].

    * PNG/other images, grayscale or RGB(A) with equal R, G, B (with alpha: read over black, so transparent
      pixels are background, as the node's RGBA mask_image; a fully transparent file is refused):
      binary 0/255 or 0/1 8-bit images give exactly {0, 1}; other 8-bit images are
      divided by 255; 16-bit images always by 65535 (that is what save_probability_png16
      writes: a map of near-zero probabilities holds only 0 and 1 and must stay near zero);
      32-bit float images are taken as they are.
    * ``.npy``: a 2-D float (or bool/int 0/1) array, finite, within [0, 1].
    * Palette-mode PNGs are label maps, not probabilities: use ``load_label_map`` and
      pick a class (``class_probability_from_label_map``, or the class option).
    """
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        return validate_probability(_load_npy(path), name=f"mask {path!r}")

    img = _open_image(path)
    mode = img.mode
    if mode == "P" or mode == "PA":
        raise G4SegError(
            f"{path!r} is a palette (indexed-colour) PNG, i.e. a label map with class indices: choose the class "
            f"to refine (g4seg refine --mask-class cat, or an index such as 8; in ComfyUI, Load Coarse Mask (G4Seg)'s "
            f"class_index_or_name; in Python, label_maps.class_probability_from_file)")
    if mode == "1":
        return np.asarray(img, dtype=bool).astype(np.float32)
    if mode in ("L", "LA"):
        return _over_black(_from_8bit(np.asarray(img.getchannel("L"))), img, path)
    if mode in SIXTEEN_BIT_MODES:
        return (np.asarray(img).astype(np.float64) / 65535.0).astype(np.float32)
    if mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise G4SegError(f"{path!r} is a 32-bit integer image with values in "
                             f"[{arr.min()}, {arr.max()}]; save the mask as an 8- or 16-bit PNG")
        return (arr.astype(np.float64) / 65535.0).astype(np.float32)
    if mode == "F":
        return validate_probability(np.asarray(img, dtype=np.float32), name=f"mask {path!r}")
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if mode == "RGBA":  # colours hidden under alpha 0 are no part of the mask
            rgb = np.where(np.asarray(img.getchannel("A"))[..., None] > 0, rgb, 0)
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise G4SegError(
                f"{path!r} is a colour image (its R, G and B channels differ), so it looks like a "
                f"colour/palette segmentation or a photo, not a grayscale probability mask. For a "
                f"coloured label map (e.g. VOC colours) choose the class (g4seg refine --mask-class cat or 8; "
                f"Load Coarse Mask (G4Seg)'s class_index_or_name); for a mask, save it as a grayscale PNG "
                f"(white = foreground)")
        return _over_black(_from_8bit(rgb[..., 0]), img, path)
    raise G4SegError(f"{path!r} has image mode {mode!r}, which is not a mask format; save the "
                     f"mask as an 8- or 16-bit grayscale PNG (white = foreground)")


def _over_black(prob: np.ndarray, img, path: str) -> np.ndarray:
    """A mask with an alpha channel is read over black, as the node reads an RGBA mask_image: transparent pixels
    are background (a stroke painted on a transparent layer). A fully transparent file has nothing drawn on it."""
    if "A" not in img.mode:
        return prob
    alpha = np.asarray(img.getchannel("A"))
    if not alpha.any():
        raise G4SegError(f"{path!r} is fully transparent (alpha 0 everywhere): nothing is drawn on it; save the "
                         "mask with the foreground painted opaque (white = foreground), or as a grayscale PNG")
    if alpha.min() == 255:
        return prob
    return (prob * (alpha.astype(np.float32) / 255.0)).astype(np.float32)


def _from_8bit(arr: np.ndarray) -> np.ndarray:
    """8-bit pixels -> [0, 1]; images holding only 0 and 1 are 0/1 binary masks."""
    if arr.max() <= 1:
        return arr.astype(np.float32)
    return (arr.astype(np.float64) / 255.0).astype(np.float32)


def save_probability_png16(prob, path: PathLike) -> str:
    """Save a probability map as a 16-bit grayscale PNG (value = round(p * 65535))."""
    arr = validate_probability(prob, name="probability map")
    out = np.round(arr.astype(np.float64) * 65535.0).astype(np.uint16)
    save_image(Image.fromarray(out), path)
    return os.fspath(path)


def save_binary_png(mask, path: PathLike, threshold: float = 0.5) -> str:
    """Save ``mask >= threshold`` (or a bool mask) as an 8-bit 0/255 PNG."""
    arr = as_numpy(mask)
    if arr.dtype != bool:
        arr = validate_probability(arr, name="mask") >= float(threshold)
    elif arr.ndim != 2:
        raise G4SegError(f"mask has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    save_image(Image.fromarray(arr.astype(np.uint8) * 255), path)
    return os.fspath(path)


def load_label_map(path: PathLike) -> np.ndarray:
    """Load a label map as uint8 [H, W] class indices (255 = ignore).

    Accepts palette (indexed) PNGs (the indices are read, the colours ignored), grayscale
    index images (8- or 16-bit with values <= 255), RGB images whose colours are all VOC
    palette colours (decoded to their indices), and integer ``.npy`` arrays.
    """
    from .palettes import voc_palette

    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        arr = _load_npy(path)
        if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise G4SegError(f"label map {path!r} has shape {arr.shape} and dtype {arr.dtype}; "
                             f"save an integer [H, W] array of class indices")
        return _check_labels(arr, path)
    img = _open_image(path)
    mode = img.mode
    if mode in ("P", "PA"):
        return np.array(img.getchannel(0) if mode == "PA" else img, dtype=np.uint8)
    if mode in ("L", "LA"):
        return np.array(img.getchannel("L"), dtype=np.uint8)
    if mode == "1":
        return np.asarray(img, dtype=bool).astype(np.uint8)
    if mode.startswith("I"):
        return _check_labels(np.asarray(img).astype(np.int64), path)
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0].copy()
        pal = voc_palette().astype(np.int64)
        code = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
        pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        lookup = {int(c): i for i, c in enumerate(pal_code)}
        uniq, inverse = np.unique(code, return_inverse=True)
        unknown = [int(u) for u in uniq if int(u) not in lookup]
        if unknown:
            shown = ", ".join(f"({u >> 16}, {(u >> 8) & 255}, {u & 255})" for u in unknown[:5])
            raise G4SegError(
                f"{path!r} is an RGB image with colours that are not PASCAL VOC palette colours "
                f"({shown}{', ...' if len(unknown) > 5 else ''}); save the label map as a palette "
                f"(indexed) PNG or a grayscale PNG of class indices")
        idx = np.array([lookup[int(u)] for u in uniq], dtype=np.uint8)
        return idx[inverse.reshape(code.shape)]
    raise G4SegError(f"{path!r} has image mode {mode!r} (a float image is a probability map, not a label map: "
                     f"refine it without a class); save a label map as a palette PNG or a grayscale PNG of "
                     f"class indices")


def _check_labels(arr: np.ndarray, path: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise G4SegError(f"label map {path!r} has values in [{arr.min()}, {arr.max()}]; class "
                         f"indices must be 0..254 (255 = ignore). A 16-bit mask or probability map is not a "
                         f"label map: refine it without a class")
    return arr.astype(np.uint8)


# PNG text chunk naming what each index of a label map means: a JSON list, entry k = the name of label k
# (0 = background). It travels with the file, so a reader (g4seg eval --coarse) maps indices by name.
LABEL_NAMES_KEY = "g4seg:label_names"


def save_label_map_png(labels, path: PathLike, label_names=None) -> str:
    """Save a uint8 [H, W] label map as a palette PNG with the VOC colours; `label_names` (name of label 0, 1,
    ...) is stored in the file (LABEL_NAMES_KEY)."""
    from PIL.PngImagePlugin import PngInfo

    from .palettes import voc_palette

    arr = as_numpy(labels)
    if arr.ndim != 2:
        raise G4SegError(f"label map has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise G4SegError(f"label map has dtype {arr.dtype}; give integer class indices")
    arr = _check_labels(arr, "labels")
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    img.putpalette(voc_palette().reshape(-1).tolist())
    info = None
    if label_names is not None:
        info = PngInfo()
        info.add_text(LABEL_NAMES_KEY, json.dumps([str(n) for n in label_names]))
    save_image(img, path, pnginfo=info)
    return os.fspath(path)


def label_map_names(path: PathLike):
    """The names a label map PNG records for its indices (save_label_map_png's label_names), or None. Reads
    the header only."""
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        return None
    with _open_image(path) as img:
        text = getattr(img, "text", {}).get(LABEL_NAMES_KEY)
    if text is None:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise G4SegError(f"label map {path!r} records damaged label names ({LABEL_NAMES_KEY}: {text[:80]!r})")
    return names
