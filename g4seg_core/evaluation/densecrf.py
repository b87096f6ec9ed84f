"""Optional fully-connected CRF (Krähenbühl & Koltun 2011) on top of a probability map.

Needs the ``pydensecrf2`` package (``pip install pydensecrf2`` or ``pip install .[crf]``);
it installs the import name ``pydensecrf``. It is imported inside ``dense_crf`` so the
rest of the package works without it.

Defaults are the DeepLab / WSSS settings: Gaussian kernel sxy=3, compat=3; bilateral
kernel sxy=80, srgb=13, compat=10; 10 mean-field iterations.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import G4SegError

__all__ = ["dense_crf", "crf_available"]

INSTALL_HINT = ("DenseCRF needs the optional package pydensecrf2: run `pip install pydensecrf2` "
                 "(or `pip install .[crf]` in the ComfyUI-G4Seg folder)")


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401  (availability check)
    except Exception:
        return False
    return True


def _import_dcrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise G4SegError(f"{INSTALL_HINT} ({exc})") from None
    return dcrf


def dense_crf(image, prob, iterations: int = 10, gaussian_sxy: float = 3,
              gaussian_compat: float = 3, bilateral_sxy: float = 80,
              bilateral_srgb: float = 13, bilateral_compat: float = 10,
              confidence: Optional[float] = None, clip: float = 1e-5) -> np.ndarray:
    """Refine a foreground probability ``[H, W]`` or a class distribution ``[C, H, W]``.

    image: uint8 ``[H, W, 3]`` RGB of the same size.
    prob: ``[H, W]`` foreground probability (a 2-label CRF, background = 1 - prob; the
      refined foreground probability ``[H, W]`` is returned) or ``[C, H, W]`` class
      probabilities (normalised over C; ``[C, H, W]`` is returned).
    confidence: if given (0 < c <= 1), the unary uses ``c * p + (1 - c) / C``, which
      keeps hard 0/1 inputs from pinning every pixel (0.8 is a common choice for masks).
    Returns float32 marginals after ``iterations`` mean-field steps.
    """
    dcrf = _import_dcrf()
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise G4SegError(f"dense_crf needs an RGB image [H, W, 3], got shape {img.shape}")
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.size and float(img.max()) <= 1.0:
            img = img * 255.0
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(img)
    p = np.asarray(prob, dtype=np.float32)
    single = p.ndim == 2
    if single:
        p = np.stack([1.0 - p, p])
    if p.ndim != 3:
        raise G4SegError(f"dense_crf needs a probability map [H, W] or [C, H, W], got shape {p.shape}")
    c, h, w = p.shape
    if (h, w) != img.shape[:2]:
        raise G4SegError(f"image {img.shape[:2]} and probability map {(h, w)} differ in size; "
                         "resize the mask to the image first")
    if c < 2:
        raise G4SegError("dense_crf needs at least 2 labels ([C, H, W] with C >= 2)")
    if not np.all(np.isfinite(p)):
        raise G4SegError("dense_crf: the probability map holds NaN or infinite values")
    if not isinstance(iterations, int) or iterations < 1:
        raise G4SegError(f"iterations={iterations}: use an integer >= 1")
    p = np.clip(p, 0.0, None)
    total = p.sum(0, keepdims=True)
    p = np.where(total > 0, p / np.maximum(total, 1e-12), 1.0 / c)
    if confidence is not None:
        if not 0.0 < float(confidence) <= 1.0:
            raise G4SegError(f"confidence={confidence}: use a value in (0, 1]")
        p = float(confidence) * p + (1.0 - float(confidence)) / c
    unary = -np.log(np.clip(p, clip, 1.0)).reshape(c, -1).astype(np.float32)

    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    if gaussian_compat:
        crf.addPairwiseGaussian(sxy=float(gaussian_sxy), compat=float(gaussian_compat))
    if bilateral_compat:
        crf.addPairwiseBilateral(sxy=float(bilateral_sxy), srgb=float(bilateral_srgb),
                                 rgbim=img, compat=float(bilateral_compat))
    q = np.asarray(crf.inference(int(iterations)), dtype=np.float32).reshape(c, h, w)
    return q[1].copy() if single else q
