"""Mask / probability / label-map IO, validation, softening, resizing, multi-class fusion.

Conventions (docs/ARCHITECTURE.md): a probability map is a float32 numpy array [H, W]
with values in [0, 1]; a label map is uint8 [H, W] holding class indices, 255 = ignore.
Every function here takes and returns numpy arrays (torch tensors are accepted as
input and converted). Problems a user can cause raise G4SegError naming the fix.

Binary inputs (SPEC step 10): a hard 0/1 mask has no pixel inside the coarse-filtering
band and cannot cross the threshold, so ``soften_binary`` turns it into a probability
map first, and says in its description which softening was used.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import SOFTEN_MODES
from .errors import G4SegError

PathLike = Union[str, "os.PathLike[str]"]

IGNORE_INDEX = 255
RESIZE_MODES = ("bilinear", "nearest", "area")

# Values this far outside [0, 1] are float round-off and are clipped, not rejected.
_RANGE_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- helpers

def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_hw(size_hw, what: str = "size") -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size_hw)
    except (TypeError, ValueError):
        raise G4SegError(f"{what}={size_hw!r}: give (height, width) as two positive integers") from None
    if h <= 0 or w <= 0:
        raise G4SegError(f"{what}={size_hw!r}: give (height, width) as two positive integers")
    return h, w


def _open_image(path: PathLike) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise G4SegError(f"mask file not found: {path!r}; check the path (relative paths are "
                         f"taken from the current directory {os.getcwd()!r})")
    if os.path.isdir(path):
        raise G4SegError(f"{path!r} is a folder, not an image file; give the path of a PNG mask")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise G4SegError(f"cannot read {path!r} as an image ({exc}); save the mask as a PNG "
                         f"(8- or 16-bit grayscale) or a .npy float array") from exc
    return img


def _load_npy(path: PathLike) -> np.ndarray:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise G4SegError(f"mask file not found: {path!r}; check the path")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise G4SegError(f"cannot read {path!r} as a .npy array ({exc}); save it with "
                         f"numpy.save(path, array) (no pickled objects)") from exc
    if not isinstance(arr, np.ndarray):  # .npz
        raise G4SegError(f"{path!r} holds several arrays (.npz); save one [H, W] array with numpy.save")
    return arr


# --------------------------------------------------------------------------- validation

def validate_probability(prob, name: str = "mask") -> np.ndarray:
    """Check a probability map and return it as a float32 [H, W] numpy array.

    Must be 2-D, numeric, finite and within [0, 1] (values within 1e-4 of the range are
    round-off and clipped). Boolean arrays become 0/1. Raises G4SegError naming the
    problem and the fix.
    """
    arr = _as_numpy(prob)
    if arr.dtype == bool:
        arr = arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise G4SegError(f"{name} has dtype {arr.dtype}: give a numeric [H, W] array of "
                         f"probabilities in [0, 1]")
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
            hint = " (it has a single channel: drop it, e.g. mask[0] or mask[..., 0])"
        elif arr.ndim == 3:
            hint = (" (several channels: for a colour/palette label map use load_label_map "
                    "and pick a class; for one map per class pass them one at a time)")
        raise G4SegError(f"{name} has shape {tuple(arr.shape)}; a single [H, W] map is "
                         f"needed{hint}")
    if arr.size == 0:
        raise G4SegError(f"{name} is empty (shape {tuple(arr.shape)}); give a non-empty [H, W] map")
    arr = arr.astype(np.float32, copy=False)
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int((~finite).sum()) - n_nan
        parts = []
        if n_nan:
            parts.append(f"{n_nan} NaN value{'s' if n_nan != 1 else ''}")
        if n_inf:
            parts.append(f"{n_inf} infinite value{'s' if n_inf != 1 else ''}")
        raise G4SegError(
            f"{name} contains {' and '.join(parts)} (of {arr.size} pixels); replace them before "
            f"refining, e.g. numpy.nan_to_num(mask, nan=0.0, posinf=1.0, neginf=0.0), and check "
            f"the segmenter that produced it (a division by zero when normalising a CAM is the "
            f"usual cause)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -_RANGE_TOLERANCE or hi > 1.0 + _RANGE_TOLERANCE:
        if hi <= 255.0 and lo >= 0.0 and hi > 1.0:
            fix = "it looks like 0..255 values: divide by 255"
        elif hi <= 65535.0 and lo >= 0.0 and hi > 255.0:
            fix = "it looks like 16-bit values: divide by 65535"
        else:
            fix = ("if these are logits apply a sigmoid; if it is an unnormalised score map "
                   "(e.g. a CAM) rescale it, (x - min) / (max - min)")
        raise G4SegError(f"{name} has values in [{lo:g}, {hi:g}], outside [0, 1]; {fix}")
    if lo < 0.0 or hi > 1.0:
        arr = np.clip(arr, 0.0, 1.0)
    return np.ascontiguousarray(arr, dtype=np.float32)


def validate_pair(image_hw: Sequence[int], mask_hw: Sequence[int]) -> None:
    """Raise G4SegError if the mask's (H, W) differs from the image's (H, W).

    Never resizes: a silently resized mask hides a wrong pairing of files.
    """
    ih, iw = _check_hw(image_hw, "image size")
    mh, mw = _check_hw(mask_hw, "mask size")
    if (ih, iw) != (mh, mw):
        raise G4SegError(
            f"the mask is {mw}x{mh} (width x height) but the image is {iw}x{ih}; the coarse mask "
            f"must cover the image pixel for pixel. Check that the mask belongs to this image, "
            f"then resize the mask to the image size ({iw}x{ih}), e.g. "
            f"resize_probability(mask, ({ih}, {iw})), or turn on the option to resize the mask "
            f"to the image")


def is_binary(prob) -> bool:
    """True if every value is exactly 0 or 1 (within 1e-6)."""
    arr = _as_numpy(prob)
    if arr.dtype == bool:
        return True
    arr = arr.astype(np.float32, copy=False)
    return bool(np.all((np.abs(arr) <= 1e-6) | (np.abs(arr - 1.0) <= 1e-6)))


# --------------------------------------------------------------------------- IO

def load_probability(path: PathLike) -> np.ndarray:
    """Load a coarse foreground map as float32 [H, W] in [0, 1].

    * PNG/other images, grayscale or RGB(A) with equal R, G, B (alpha is ignored):
      binary 0/255 or 0/1 images give exactly {0, 1}; other 8-bit images are divided
      by 255; 16-bit images by 65535 (16-bit 0/1 images also give {0, 1}); 32-bit
      float images are taken as they are.
    * ``.npy``: a 2-D float (or bool/int 0/1) array, finite, within [0, 1].
    * Palette-mode PNGs are label maps, not probabilities: use ``load_label_map`` and
      pick a class (``class_probability_from_label_map``, or the class option).
    """
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        arr = _load_npy(path)
        if arr.dtype == bool:
            arr = arr.astype(np.float32)
        return validate_probability(arr, name=f"mask {path!r}")

    img = _open_image(path)
    mode = img.mode
    if mode == "P" or mode == "PA":
        raise G4SegError(
            f"{path!r} is a palette (indexed-colour) PNG, i.e. a label map with class indices. "
            f"Load it with load_label_map and choose the class to refine "
            f"(class_probability_from_label_map, or set the class option, e.g. class 'cat' or 8)")
    if mode == "1":
        return np.asarray(img, dtype=bool).astype(np.float32)
    if mode in ("L", "LA"):
        arr = np.asarray(img.getchannel("L"))
        return _from_integer(arr, 255.0)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.int64)
        return _from_integer(arr, 65535.0)
    if mode == "I":
        arr = np.asarray(img).astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            raise G4SegError(f"{path!r} is a 32-bit integer image with values in "
                             f"[{arr.min()}, {arr.max()}]; save the mask as an 8- or 16-bit PNG")
        return _from_integer(arr, 65535.0)
    if mode == "F":
        return validate_probability(np.asarray(img, dtype=np.float32), name=f"mask {path!r}")
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise G4SegError(
                f"{path!r} is a colour image (its R, G and B channels differ), so it looks like a "
                f"colour/palette segmentation or a photo, not a grayscale probability mask. For a "
                f"coloured label map (e.g. VOC colours) use load_label_map and choose the class "
                f"(class option); for a mask, save it as a grayscale PNG (white = foreground)")
        return _from_integer(rgb[..., 0], 255.0)
    raise G4SegError(f"{path!r} has image mode {mode!r}, which is not a mask format; save the "
                     f"mask as an 8- or 16-bit grayscale PNG (white = foreground)")


def _from_integer(arr: np.ndarray, full_scale: float) -> np.ndarray:
    """Integer pixels -> [0, 1]; images holding only 0 and 1 are 0/1 binary masks."""
    if arr.max() <= 1:
        return arr.astype(np.float32)
    return (arr.astype(np.float64) / full_scale).astype(np.float32)


def _prepare_dir(path: PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return path


def save_probability_png16(prob, path: PathLike) -> str:
    """Save a probability map as a 16-bit grayscale PNG (value = round(p * 65535))."""
    arr = validate_probability(prob, name="probability map")
    out = np.round(arr.astype(np.float64) * 65535.0).astype(np.uint16)
    path = _prepare_dir(path)
    Image.fromarray(out).save(path, format="PNG")
    return path


def save_binary_png(mask, path: PathLike, threshold: float = 0.5) -> str:
    """Save ``mask >= threshold`` (or a bool mask) as an 8-bit 0/255 PNG."""
    arr = _as_numpy(mask)
    if arr.dtype != bool:
        arr = validate_probability(arr, name="mask") >= float(threshold)
    elif arr.ndim != 2:
        raise G4SegError(f"mask has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    path = _prepare_dir(path)
    Image.fromarray(arr.astype(np.uint8) * 255).save(path, format="PNG")
    return path


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
    raise G4SegError(f"{path!r} has image mode {mode!r}; save the label map as a palette PNG "
                     f"or a grayscale PNG of class indices")


def _check_labels(arr: np.ndarray, path: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise G4SegError(f"label map {path!r} has values in [{arr.min()}, {arr.max()}]; class "
                         f"indices must be 0..254 (255 = ignore)")
    return arr.astype(np.uint8)


def save_label_map_png(labels, path: PathLike) -> str:
    """Save a uint8 [H, W] label map as a palette PNG with the VOC colours."""
    from .palettes import voc_palette

    arr = _as_numpy(labels)
    if arr.ndim != 2:
        raise G4SegError(f"label map has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise G4SegError(f"label map has dtype {arr.dtype}; give integer class indices")
    arr = _check_labels(arr, "labels")
    img = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr).tobytes())
    img.putpalette(voc_palette().reshape(-1).tolist())
    path = _prepare_dir(path)
    img.save(path, format="PNG")
    return path


# --------------------------------------------------------------------------- distance transform

_BIG = 1e12  # "no feature" squared distance; finite so the envelope arithmetic stays exact


def _lower_envelope_rows(f: np.ndarray) -> np.ndarray:
    """Felzenszwalb-Huttenlocher 1-D squared distance transform of every row of ``f``.

    ``f`` is float64 [R, n] (0 at features, a column-pass squared distance, or _BIG).
    Returns ``d[r, q] = min_p (q - p)^2 + f[r, p]``, exact. The lower envelope of the
    parabolas is built for all rows at once: the loop runs over the n positions, and
    the "pop" step repeats only while some row still has parabolas to pop (amortised
    O(n) pops per row). The envelope is then read off with one searchsorted over all
    rows (rows are offset so that they stay sorted when flattened).
    """
    R, n = f.shape
    rows = np.arange(R)
    v = np.zeros((R, n), dtype=np.int64)  # apex positions of envelope parabolas
    z = np.full((R, n + 1), np.inf)  # z[k]..z[k+1]: where parabola k is the minimum
    z[:, 0] = -np.inf
    k = np.zeros(R, dtype=np.int64)
    fv = f + np.arange(n, dtype=np.float64)[None, :] ** 2  # f(p) + p^2
    for q in range(1, n):
        fq = fv[:, q]
        while True:
            vk = v[rows, k]
            s = (fq - fv[rows, vk]) / (2.0 * (q - vk))
            pop = s <= z[rows, k]
            if not pop.any():
                break
            k = k - pop  # z[0] = -inf never pops, so k stays >= 0
        k = k + 1
        v[rows, k] = q
        z[rows, k] = s
        z[rows, k + 1] = np.inf
    # Breakpoints z[1..k_r] per row; stale entries beyond k_r are masked to the top.
    zb = z[:, 1:n + 1]
    zb = np.where(np.arange(n)[None, :] < k[:, None], zb, np.inf)
    zb = np.clip(zb, -1.0, n + 1.0)
    stride = n + 3.0
    offsets = rows[:, None] * stride
    flat = (zb + offsets).reshape(-1)
    queries = (np.arange(n, dtype=np.float64)[None, :] + offsets).reshape(-1)
    idx = np.searchsorted(flat, queries, side="left").reshape(R, n) - rows[:, None] * n
    apex = v[rows[:, None], idx]
    q = np.arange(n)[None, :]
    return (q - apex).astype(np.float64) ** 2 + f[rows[:, None], apex]


def _column_sqdist(features: np.ndarray) -> np.ndarray:
    """Squared 1-D distance along axis 1 (rows of [B, H, W]) to the nearest feature in each column."""
    B, H, W = features.shape
    i = np.arange(H)[None, :, None]
    last = np.maximum.accumulate(np.where(features, i, -1), axis=1)
    nxt = np.minimum.accumulate(np.where(features, i, 2 * H + 1)[:, ::-1], axis=1)[:, ::-1]
    d_up = np.where(last >= 0, i - last, np.inf)
    d_down = np.where(nxt <= H, nxt - i, np.inf)
    d = np.minimum(d_up, d_down)
    return np.where(np.isfinite(d), d * d, _BIG)


def euclidean_distance_transform(features) -> np.ndarray:
    """Exact Euclidean distance from every pixel centre to the nearest True pixel centre.

    ``features`` is bool [H, W] (or a stack [B, H, W]); returns float32 of the same
    shape, 0 on features, ``inf`` everywhere if there is no feature. Separable exact
    EDT: a vectorised column pass, then the Felzenszwalb-Huttenlocher lower-envelope
    transform along rows (all rows of all stacked images at once). 512x512: ~0.1 s.
    """
    feats = np.asarray(features).astype(bool)
    squeeze = feats.ndim == 2
    if squeeze:
        feats = feats[None]
    if feats.ndim != 3:
        raise G4SegError(f"distance transform needs a [H, W] mask, got shape {feats.shape}")
    B, H, W = feats.shape
    g = _column_sqdist(feats)  # [B, H, W]
    d2 = _lower_envelope_rows(g.reshape(B * H, W)).reshape(B, H, W)
    d = np.where(d2 >= _BIG / 2, np.inf, np.sqrt(d2)).astype(np.float32)
    return d[0] if squeeze else d


def signed_distance(mask) -> np.ndarray:
    """Signed distance to the mask boundary, in pixels: > 0 inside, < 0 outside.

    The boundary lies half-way between an inside and an outside pixel centre, so a
    pixel at Euclidean distance d from the nearest pixel of the other side gets
    ``+-(d - 0.5)``: the pixels next to the boundary get +-0.5. ``mask`` is bool or 0/1.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise G4SegError(f"mask has shape {m.shape}; a single [H, W] map is needed")
    d = euclidean_distance_transform(np.stack([~m, m]))  # [0]: to outside, [1]: to inside
    return np.where(m, d[0] - 0.5, -(d[1] - 0.5)).astype(np.float32)


# --------------------------------------------------------------------------- softening

def _gaussian_blur(prob: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None]
    # Replicate padding: a mask touching the image border stays 1 at the border.
    t = F.pad(t, (radius, radius, 0, 0), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, 1, -1))
    t = F.pad(t, (0, 0, radius, radius), mode="replicate")
    t = F.conv2d(t, kernel.view(1, 1, -1, 1))
    return t[0, 0].clamp_(0.0, 1.0).numpy()


def soften_binary(
    prob,
    mode: str = "sdf",
    width: float = 8.0,
    allow_trivial: bool = False,
) -> Tuple[np.ndarray, str]:
    """Turn a binary mask into a probability map (SPEC step 10); returns (soft, description).

    * ``"sdf"``: ``sigmoid(signed_distance / (width / 4))`` with the exact Euclidean
      signed distance (``signed_distance``): 0.5 on the boundary, rising to ~0.88 at
      ``width / 2`` pixels inside and ~0.98 at ``width`` pixels; falling likewise
      outside. ``width`` is thus the distance over which the map goes from ~0.12 to
      ~0.88, in pixels of the map as given (the working size in the pipeline).
    * ``"blur"``: Gaussian blur with sigma ``width / 2`` (separable, replicate border).
    * ``"none"``: the mask unchanged.

    Soft inputs (any value strictly between 0 and 1) are returned unchanged with the
    description "soft input, not softened". An all-0 (empty) or all-1 (full) binary
    mask has nothing to refine, whatever the mode: G4SegError, unless
    ``allow_trivial=True``, which returns it unchanged (e.g. batch evaluation, where a
    class the coarse segmenter missed should simply stay missed).
    """
    arr = validate_probability(prob)
    if mode not in SOFTEN_MODES:
        raise G4SegError(f"soften={mode!r}: choose one of {SOFTEN_MODES}")
    if not is_binary(arr):
        return arr, "soft input, not softened"
    arr = np.round(arr).astype(np.float32)
    total = float(arr.sum())
    if total == 0.0 or total == float(arr.size):
        if allow_trivial:
            kind = "empty" if total == 0.0 else "full"
            return arr, f"{kind} mask, returned unchanged (nothing to refine)"
        if total == 0.0:
            raise G4SegError(
                "the coarse mask is empty (no foreground pixel), so there is nothing to refine: "
                "the class was not found by the coarse segmenter (or the wrong class/channel was "
                "picked). Check the class name/index and the mask, or set allow_trivial to pass "
                "empty masks through unchanged")
        raise G4SegError(
            "the coarse mask covers the whole image (every pixel is foreground), so there is no "
            "boundary to refine. Check that the mask is not inverted and belongs to this class, "
            "or set allow_trivial to pass full masks through unchanged")
    if mode == "none":
        return arr, "binary input, not softened (soften='none')"
    width = float(width)
    if not (math.isfinite(width) and width > 0):
        raise G4SegError(f"soften_width={width}: use a width in pixels > 0 (default 8), "
                         f"or soften='none' to keep the binary mask")
    if mode == "sdf":
        scale = width / 4.0
        sd = signed_distance(arr > 0.5).astype(np.float64)
        soft = (1.0 / (1.0 + np.exp(-sd / scale))).astype(np.float32)
        return soft, (f"binary input softened: sigmoid(signed distance / {scale:g} px) "
                      f"(soften='sdf', width={width:g} px)")
    sigma = width / 2.0
    soft = _gaussian_blur(arr, sigma)
    return soft, (f"binary input softened: Gaussian blur, sigma {sigma:g} px "
                  f"(soften='blur', width={width:g} px)")


# --------------------------------------------------------------------------- resizing

def resize_probability(prob, size_hw: Sequence[int], mode: str = "bilinear") -> np.ndarray:
    """Resize a probability map to ``size_hw`` = (H, W) with torch interpolate.

    ``"bilinear"`` (align_corners=False, antialiased when shrinking), ``"nearest"``
    (``nearest-exact``, pixel-centre sampling like PIL; keeps binary masks binary) or
    ``"area"`` (box average; for shrinking). Returns float32 [H, W] in [0, 1].
    """
    arr = validate_probability(prob)
    h, w = _check_hw(size_hw)
    if mode not in RESIZE_MODES:
        raise G4SegError(f"resize mode {mode!r}: choose one of {RESIZE_MODES}")
    if arr.shape == (h, w):
        return arr.copy()
    t = torch.from_numpy(arr)[None, None]
    if mode == "bilinear":
        shrinking = h < arr.shape[0] or w < arr.shape[1]
        out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=shrinking)
    elif mode == "nearest":
        out = F.interpolate(t, size=(h, w), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(h, w), mode="area")
    return out[0, 0].clamp_(0.0, 1.0).numpy()


def to_working_size(prob, size: Union[int, Sequence[int]] = 512,
                    mode: str = "auto") -> Tuple[np.ndarray, Tuple[int, int]]:
    """Resize a map to the working resolution (SPEC step 1); returns (map, original (H, W)).

    ``size`` is an int (size x size) or (H, W). ``mode="auto"`` uses nearest for binary
    masks, so they stay binary and are softened at the working size (bilinear would
    leave a 1-pixel soft rim and make the mask look "soft"), and bilinear otherwise.
    """
    arr = validate_probability(prob)
    target = (int(size), int(size)) if isinstance(size, (int, np.integer)) else _check_hw(size)
    if mode == "auto":
        mode = "nearest" if is_binary(arr) else "bilinear"
    return resize_probability(arr, target, mode), (int(arr.shape[0]), int(arr.shape[1]))


def from_working_size(prob, original_hw: Sequence[int], mode: str = "bilinear") -> np.ndarray:
    """Map a working-size result back to the original (H, W) (bilinear by default)."""
    return resize_probability(prob, _check_hw(original_hw, "original size"), mode)


# --------------------------------------------------------------------------- multi-class

def fuse_multiclass(probs: Mapping[int, np.ndarray], bg_power: float = 1.0) -> np.ndarray:
    """Fuse per-class maps into a label map (SPEC "Inputs and output", CLIP-ES convention).

    ``probs`` maps class index (1..254) -> probability [H, W]. The background channel is
    ``bg = (1 - max_c S_c) ** bg_power``; each pixel gets the argmax over
    [bg, S_c1, S_c2, ...] (background = index 0; ties go to the earlier channel, i.e.
    background first, then classes in ascending index). Returns uint8 [H, W].
    """
    if not probs:
        raise G4SegError("fuse_multiclass got no class maps; pass {class_index: probability map}")
    bg_power = float(bg_power)
    if not (math.isfinite(bg_power) and bg_power > 0):
        raise G4SegError(f"bg_power={bg_power}: use a number > 0 (default 1)")
    classes = []
    maps = []
    shape = None
    for cls in sorted(probs, key=lambda c: int(c)):
        if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
            raise G4SegError(f"class key {cls!r}: use integer class indices (e.g. VOC cat = 8)")
        c = int(cls)
        if not 1 <= c <= 254:
            raise G4SegError(f"class index {c}: use 1..254 (0 is background, 255 is ignore)")
        m = validate_probability(probs[cls], name=f"class {c} map")
        if shape is None:
            shape = m.shape
        elif m.shape != shape:
            raise G4SegError(f"class {c} map is {m.shape[1]}x{m.shape[0]} but class {classes[0]} "
                             f"map is {shape[1]}x{shape[0]} (width x height); resize them to the "
                             f"same size first")
        classes.append(c)
        maps.append(m)
    stack = np.stack(maps)  # [C, H, W]
    bg = (1.0 - stack.max(axis=0)) ** bg_power
    winner = np.argmax(np.concatenate([bg[None], stack]), axis=0)
    lut = np.array([0] + classes, dtype=np.uint8)
    return lut[winner]


def class_probability_from_label_map(labels, class_index: Union[int, str]) -> np.ndarray:
    """Binary float32 map (1 where ``labels == class_index``) from a label map.

    ``class_index`` is an index or a VOC class name. Ignore pixels (255) count as 0 (not
    this class): they are usually object borders or unlabelled pixels, and refinement
    decides them from the image. Asking for class 255 itself is an error.
    """
    from .palettes import voc_class_index

    arr = _as_numpy(labels)
    if arr.ndim != 2:
        raise G4SegError(f"label map has shape {tuple(arr.shape)}; a single [H, W] map is needed")
    if isinstance(class_index, str):
        idx = voc_class_index(class_index)
    else:
        idx = int(class_index)
    if idx == IGNORE_INDEX:
        raise G4SegError("class 255 is the 'ignore' label, not a class; pick a class index 0..254")
    if not 0 <= idx <= 254:
        raise G4SegError(f"class index {idx}: use 0..254")
    return (arr == idx).astype(np.float32)


def prepare_coarse(mask, working_size: int = 512, soften: str = "sdf",
                   width: float = 8.0) -> Tuple[np.ndarray, str]:
    """The probability map G4Seg refines, at the mask's own resolution: (prob, description).

    Validates (NaN, range), refuses empty and full masks, and softens a binary mask (SPEC step
    10) with `width` given in working-size pixels (scaled to the mask's resolution). Soft maps
    are returned unchanged. Both the core pipeline and the ComfyUI nodes call this.
    """
    prob = validate_probability(mask, name="mask")
    if float(prob.max()) <= 0.0:
        raise G4SegError("the mask is empty (all zero): the coarse segmenter found no pixel of this class, "
                         "so there is nothing to refine")
    if float(prob.min()) >= 1.0:
        raise G4SegError("the mask covers the whole image (all one): there is no boundary to refine")
    binary = is_binary(prob)
    if binary and soften != "none":
        scale = max(prob.shape) / float(working_size)
        return soften_binary(prob, mode=soften, width=width * scale)
    return prob, "binary input, softening off" if binary else "soft input, not softened"
