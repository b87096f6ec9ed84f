"""The method's orchestration, written once (SPEC steps 1-10), over a small backend interface.

validate -> image to working size -> encode -> CLIP features -> prepare mask -> prompt and
class-token positions -> noise, inject the mask, one-step denoise -> decode -> CLIP features
-> match -> mix. Two backends implement `Backend`: the diffusers one (pipeline.G4SegPipeline)
and the ComfyUI one (nodes/comfy/backend.py); `g4seg refine`, `g4seg eval` and the
G4SegRefine node all run `refine_batch` below, so they give the same masks on the same weights.

Rules that hold on both sides (README, docs/NODES.md):
* images are resized to the working size with antialiased bicubic interpolation;
* size 0 keeps the image size (rounded down to a multiple of 8);
* a mask may have any resolution with the image's aspect ratio; the result has the mask's size;
* soften_width is in working-size pixels (scaled to the mask's resolution);
* image i of a batch gets the noise of `seed + i` (drawn as for a batch of one).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import G4SegConfig
from ..errors import G4SegError
from ..knobs import check_finite
from .injection import InjectionBatch
from .masks import check_same_framing, resize_maps
from .correspondence import grid_match_to_pixels
from .mixing import feature_match, mix_probabilities
from .softening import prepare_coarse_batch


class Backend(Protocol):
    """What the flow needs from a diffusion model and a CLIP image encoder.

    Pixels are float [B, 3, H, W] in [0, 1] (any device; the backend moves them). Latents are
    the backend's own (its latent space and scaling); the flow only reads their shape.
    """

    device: torch.device  # where the flow puts pixels and masks before working on them (the models' device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def prompt(self, prompt: str, label: Optional[str], occurrences: int = 1) -> Tuple[Any, List[int]]:
        """(encoded prompt, positions of the label's tokens in it; [] when label is None).

        `occurrences`: how many '{}' the template has; the label's last that many matches are all
        injected (a template with two '{}' injects both)."""

    def denoise(self, latents: torch.Tensor, noise: torch.Tensor, prompts: Sequence[Any],
                injection: Optional[InjectionBatch], config: G4SegConfig,
                negative: Any = None) -> torch.Tensor:
        """Noise latents to config.timestep with `noise` (float32, CPU, latents' shape), one model
        call for the whole batch with the masks injected (one prompt per row, class names may differ;
        `injection`: a mask and class tokens per row, None for none; CFG with `negative` when
        config.cfg_scale != 1), return the x0 prediction in the same latent space."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def features(self, pixels: torch.Tensor, kind: str = "last_layer") -> torch.Tensor:
        """Dense CLIP features [B, C, h, w], L2-normalised per location; kind: config.CLIP_FEATURE_MODES
        ("naclip": NACLIP's last block, g4seg_core.zeroshot.neighbourhood)."""

    def sync(self) -> None:
        """Wait for queued device work (so stage timings are the stage's own)."""


@dataclass
class RefineResult:
    prob: np.ndarray  # refined probability [H, W] float32, input mask size
    binary: np.ndarray  # prob >= threshold, bool [H, W]
    coarse: np.ndarray  # the probability map that was refined (after softening) [H, W]
    generated_pixels: np.ndarray  # one-step reconstruction, float32 [h, w, 3] in [0, 1], working size
    correspondence: np.ndarray  # grid match [h, w] of flat indices
    timings: Dict[str, float]
    softening: str
    label: str
    prompt: str
    token_positions: Sequence[int]
    config: G4SegConfig

    @property
    def generated(self) -> Image.Image:
        return Image.fromarray((self.generated_pixels * 255).round().astype(np.uint8))

    def summary(self) -> dict:
        return {"label": self.label, "prompt": self.prompt, "token_positions": list(self.token_positions),
                "softening": self.softening, "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
                "coarse_foreground_fraction": float((self.coarse >= self.config.threshold).mean()),
                "refined_foreground_fraction": float(self.binary.mean()),
                "changed_pixels": int(np.count_nonzero(np.abs(self.prob - self.coarse) > 1e-6))}


@dataclass
class ImageContext:
    """Per-image work shared by every mask of that image."""

    latent: torch.Tensor  # [1, ...] the backend's latent of the working-size image
    orig_feats: torch.Tensor  # [C, h, w]
    size_hw: Tuple[int, int]  # original image size
    work_hw: Tuple[int, int]  # working size


# ---- inputs -------------------------------------------------------------------------------
def image_to_tensor(image, device=None) -> torch.Tensor:
    """PIL / numpy / torch RGB image [H, W, 3] (uint8, or float in [0, 1]) -> float32 [3, H, W] in [0, 1] on
    `device` (default: the CPU). Checked on the host, where the image is; a uint8 image moves as bytes and is
    scaled on the device."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise G4SegError(f"image mode is {image.mode!r}, G4Seg needs RGB: convert it first "
                             "(PIL: image.convert('RGB'); CLI: --convert-rgb)")
        image = np.asarray(image)
    t = image.detach().cpu() if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
    if t.dim() != 3 or t.shape[-1] != 3:
        raise G4SegError(f"image must be RGB [H, W, 3], got shape {tuple(t.shape)}: convert grayscale/RGBA to RGB first")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise G4SegError(f"image is empty ({t.shape[1]}x{t.shape[0]} px)")
    if t.dtype == torch.uint8:
        t = t.to(device).float() / 255.0
    elif t.is_floating_point():
        t = t.float()
        if not torch.isfinite(t).all():
            raise G4SegError("image contains NaN or infinite values")
        if t.min() < 0 or t.max() > 1:
            raise G4SegError("float images must lie in [0, 1]; pass uint8 for 0..255 images")
        t = t.to(device)
    else:
        raise G4SegError(f"unsupported image dtype {t.dtype}: use uint8 or float in [0, 1]")
    return t.permute(2, 0, 1).contiguous()


def working_size(size: int, hw: Sequence[int]) -> Tuple[int, int]:
    """size 0 keeps the image size (rounded down to a multiple of 8); else size x size (paper: 512x512)."""
    if size == 0:
        h, w = (int(hw[0]) // 8) * 8, (int(hw[1]) // 8) * 8
        if h < 64 or w < 64:
            raise G4SegError(f"image {hw[1]}x{hw[0]} is too small for size 0 (keep): use at least 64x64 or set size")
        return h, w
    return size, size


def resize_image(pixels: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, h, w], the one resize filter of the method: antialiased bicubic, clamped."""
    if tuple(pixels.shape[-2:]) == tuple(hw):
        return pixels
    return F.interpolate(pixels, size=tuple(hw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def batch_noise(latents: torch.Tensor, seed: int) -> torch.Tensor:
    """Row i: float32 CPU noise of seed + i, drawn for one latent (a batch of one gets the same)."""
    shape = (1, *latents.shape[1:])
    return torch.cat([torch.randn(shape, generator=torch.Generator("cpu").manual_seed((int(seed) + i) % 2 ** 64),
                                  dtype=torch.float32) for i in range(latents.shape[0])])


def check_label(label) -> str:
    if not isinstance(label, str) or not label.strip():
        raise G4SegError("class name is empty: give the class to refine (CLI --label, node class_name), e.g. cat")
    return label.strip()


@contextmanager
def _stage(backend: Backend, timings: Dict[str, float], name: str, progress: Optional[Callable[[str], None]]):
    start = time.perf_counter()
    yield
    backend.sync()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    if progress is not None:
        progress(name)


# ---- the method -------------------------------------------------------------------------------
def prepare_images(backend: Backend, images: Sequence, config: G4SegConfig, timings: Optional[dict] = None,
                   progress: Optional[Callable[[str], None]] = None) -> List[ImageContext]:
    """Latents and CLIP features of the original images, one batch per stage.

    The same image object given several times (one image, several masks) is worked on once.
    """
    timings = {} if timings is None else timings
    unique: Dict[int, int] = {}
    distinct = []
    for image in images:
        if id(image) not in unique:
            unique[id(image)] = len(distinct)
            distinct.append(image)
    tensors = [image_to_tensor(image, backend.device) for image in distinct]  # resized on the models' device
    sizes = [tuple(t.shape[-2:]) for t in tensors]
    work = {working_size(config.size, hw) for hw in sizes}
    if len(work) > 1:
        raise G4SegError(f"size=0 keeps each image's size, but this batch has images of sizes {sorted(set(sizes))}: "
                         "refine them in separate batches or set size")
    work_hw = work.pop()
    pixels = torch.cat([resize_image(t[None], work_hw) for t in tensors])
    with _stage(backend, timings, "vae_encode", progress):
        latents = backend.encode(pixels)
    with _stage(backend, timings, "clip_original", progress):
        feats = backend.features(pixels, config.clip_features)
    contexts = [ImageContext(latents[i:i + 1], feats[i], sizes[i], work_hw) for i in range(len(tensors))]
    return [contexts[unique[id(image)]] for image in images]


def prepare_masks(masks: Sequence, contexts: Sequence[ImageContext], config: G4SegConfig,
                  device) -> Tuple[List[Tuple[List[int], torch.Tensor]], List[str]]:
    """Validate each mask, check its framing against its image, soften the binary ones, on `device`:
    ([(rows, their maps [n, H, W])] per mask size, one description per mask).

    The one validation of the flow: the masks of one size go to the device together, are checked there
    (one host sync for the batch) and softened there as a batch."""
    work_side = max(contexts[0].work_hw)
    return prepare_coarse_batch(masks, device, work_side, config.soften, config.soften_width,
                                check_shape=lambda row, hw: check_same_framing(contexts[row].size_hw, hw))


def refine_batch(backend: Backend, images: Sequence, masks: Sequence, labels, config: Optional[G4SegConfig] = None,
                 contexts: Optional[Sequence[ImageContext]] = None,
                 progress: Optional[Callable[[str], None]] = None) -> List[RefineResult]:
    """Refine several (image, mask, label) at once: each model runs once on the whole batch.

    `labels` is one class name for all or one per mask. Image i gets the noise of seed + i.
    `progress` is called after each stage (ComfyUI's progress bar and interrupt check).
    """
    config = (config or G4SegConfig()).validate()
    batch = len(masks)
    labels = [labels] * batch if isinstance(labels, str) else list(labels)
    if batch == 0 or len(images) != batch or len(labels) != batch:
        raise G4SegError(f"refine_batch needs as many images, masks and labels (got {len(images)}, {batch}, "
                         f"{len(labels)}), at least one")
    labels = [check_label(label) for label in labels]
    timings: Dict[str, float] = {}
    total_start = time.perf_counter()
    if contexts is None:
        contexts = prepare_images(backend, images, config, timings, progress)
    if len({c.work_hw for c in contexts}) > 1:
        raise G4SegError("the images of this batch have different working sizes: refine them separately")
    work_hw = contexts[0].work_hw

    # Masks as tensors on the model's device, checked and softened there; rows whose masks share a size move together.
    groups, softenings = prepare_masks(masks, contexts, config, backend.device)
    encoded: Dict[str, Tuple[Any, List[int]]] = {}  # one text encoding per distinct prompt
    prompts, handles, positions = [], [], []
    for label in labels:
        prompt = config.prompt_for(label)
        if prompt not in encoded:
            encoded[prompt] = backend.prompt(prompt, label, occurrences=config.prompt_template.count("{}"))
        prompts.append(prompt)
        handles.append(encoded[prompt][0])
        positions.append(encoded[prompt][1])
    negative = backend.prompt(config.negative_prompt, None)[0] if config.cfg_scale != 1.0 else None

    with _stage(backend, timings, "unet", progress):
        latents = torch.cat([c.latent for c in contexts])
        injection = None
        if config.emi_mode != "off":
            masks = torch.empty(batch, *work_hw, device=backend.device)  # where prepare_masks put the maps
            for rows, maps in groups:
                masks[rows] = resize_maps(maps, work_hw, mode="bilinear")
            injection = InjectionBatch.from_config(masks, positions, config)
        x0 = backend.denoise(latents, batch_noise(latents, config.seed), handles, injection, config, negative)
    with _stage(backend, timings, "vae_decode", progress):
        generated = resize_image(backend.decode(x0).float(), work_hw)  # VAEs may crop to a multiple of 8
        check_finite(generated, "the generated image (UNet + VAE decode)",
                     {k: getattr(config, k) for k in ("timestep", "cross_weight", "self_weight", "cfg_scale", "dtype")},
                     "fp16 overflow is the usual cause: try --dtype float32 or bfloat16, or a lower cross_weight")
    with _stage(backend, timings, "clip_generated", progress):
        gen_feats = backend.features(generated, config.clip_features)

    start = time.perf_counter()
    # One batched match for every row, then displacement and mixing per mask size (usually one group).
    orig_feats = torch.stack([c.orig_feats for c in contexts]).to(gen_feats.device)
    match = feature_match(orig_feats, gen_feats, config.direction, config.correspondence_grid)
    refined: List[Optional[np.ndarray]] = [None] * batch
    probs: List[Optional[np.ndarray]] = [None] * batch
    for rows, maps in groups:
        index = torch.tensor(rows, device=match.device)
        delta = grid_match_to_pixels(match.index_select(0, index), *maps.shape[-2:])
        maps = maps.to(match.device).float()
        mixed = mix_probabilities(maps, delta, config.beta, config.band, config.iterations)
        both = torch.stack([mixed.float(), maps]).cpu().numpy()  # refined and coarse maps: one copy to the host
        check_finite(both[0], "the correspondence and mixing",
                     {k: getattr(config, k) for k in ("beta", "band", "iterations", "correspondence_grid")})
        for j, row in enumerate(rows):
            refined[row], probs[row] = both[0, j], both[1, j]
    matches = match.cpu().numpy()
    backend.sync()
    timings["correspondence_and_mixing"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - total_start
    if batch > 1:
        timings["batch_size"] = batch

    pictures = generated.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    return [RefineResult(prob=refined[i], binary=refined[i] >= config.threshold, coarse=probs[i],
                         generated_pixels=pictures[i], correspondence=matches[i], timings=dict(timings),
                         softening=softenings[i], label=labels[i], prompt=prompts[i],
                         token_positions=positions[i], config=config) for i in range(batch)]
