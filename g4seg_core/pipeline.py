"""G4SegPipeline: the whole method on diffusers + CLIP models (SPEC steps 1-10).

refine(image, mask, label, config) -> RefineResult. Each stage is a method so the
benchmark can time the bare model passes against the end-to-end path.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import masks as mask_ops
from .label_maps import fuse_multiclass
from .softening import prepare_coarse
from .config import G4SegConfig
from .diffusers_patch import InjectionState, injected
from .errors import G4SegError
from .injection import InjectionSettings
from .mixing import correspondence_for, mix_foreground
from .schedule import add_noise, alpha_bar_at, predict_x0
from .tokens import find_token_positions

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RefineResult:
    prob: np.ndarray  # refined probability [H, W] float32, input mask size
    binary: np.ndarray  # prob >= threshold, bool [H, W]
    coarse: np.ndarray  # the probability map that was refined (after softening) [H, W]
    generated: Image.Image  # mask-conditioned one-step reconstruction at the working size
    correspondence: np.ndarray  # grid match [h, w] of flat indices
    timings: Dict[str, float]
    softening: str
    label: str
    prompt: str
    token_positions: Sequence[int]
    config: G4SegConfig

    def summary(self) -> dict:
        return {"label": self.label, "prompt": self.prompt, "token_positions": list(self.token_positions),
                "softening": self.softening, "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
                "coarse_foreground_fraction": float((self.coarse >= self.config.threshold).mean()),
                "refined_foreground_fraction": float(self.binary.mean()),
                "changed_pixels": int(np.count_nonzero(np.abs(self.prob - self.coarse) > 1e-6))}


@dataclass
class MultiRefineResult:
    labels: np.ndarray  # fused label map uint8 [H, W], 0 = background
    class_indices: Dict[str, int]
    results: Dict[str, RefineResult] = field(default_factory=dict)


@dataclass
class ImageContext:
    """Per-image work shared by every class of a multi-class refinement."""

    pixels: torch.Tensor  # [1, 3, S, S] in [0, 1] on the pipeline device
    z0: torch.Tensor
    orig_feats: torch.Tensor  # [C, h, w]
    size_hw: tuple  # original image size


def image_to_array(image) -> np.ndarray:
    """PIL / numpy / torch image -> uint8 [H, W, 3]; anything but RGB is an error naming the fix."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise G4SegError(f"image mode is {image.mode!r}, G4Seg needs RGB: convert it first "
                             "(PIL: image.convert('RGB'); CLI: --convert-rgb)")
        return np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise G4SegError(f"image must be RGB [H, W, 3], got shape {array.shape}: convert grayscale/RGBA to RGB first")
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise G4SegError("image contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise G4SegError("float images must lie in [0, 1]; pass uint8 for 0..255 images")
        return np.round(array * 255).astype(np.uint8)
    raise G4SegError(f"unsupported image dtype {array.dtype}: use uint8 or float in [0, 1]")


class G4SegPipeline:
    def __init__(self, components, clip, device: Optional[str] = None, dtype="float32"):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.components = components.to(self.device, self.dtype)
        self.clip = clip.to(self.device, self.dtype if self.device.type == "cuda" else torch.float32)
        self._prompt_cache: "OrderedDict[str, object]" = OrderedDict()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint=None, clip=None, comfyui_dir=None, family=None,
                        device=None, dtype="float32") -> "G4SegPipeline":
        """Load from files on disk (never downloads); see model_files for the search order."""
        from .clip_loading import load_clip_vision
        from .sd_loading import load_sd_components
        from .model_files import find_checkpoint, find_clip_vision

        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        ckpt = find_checkpoint(checkpoint, comfyui_dir)
        clip_path = find_clip_vision(clip, comfyui_dir)
        components = load_sd_components(ckpt, family=family, dtype=torch_dtype, device="cpu")
        clip_model = load_clip_vision(clip_path, device="cpu")
        return cls(components, clip_model, device=device, dtype=torch_dtype)

    @classmethod
    def tiny(cls, family: str = "sd21", prediction_type: str = "epsilon", seed: int = 0,
             device: str = "cpu") -> "G4SegPipeline":
        """Random-weight tiny models: checks the installation and the plumbing, not the result."""
        from .tiny import tiny_clip_features, tiny_sd_components

        return cls(tiny_sd_components(family=family, prediction_type=prediction_type, seed=seed),
                   tiny_clip_features(seed=seed), device=device)

    # ---- stages -------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_pixels(self, image: np.ndarray, size: int) -> torch.Tensor:
        """uint8 [H, W, 3] -> [1, 3, size, size] in [0, 1] (plain resize, no crop)."""
        t = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
        t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return t.clamp(0, 1).to(self.device)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        latent = vae.encode((pixels * 2 - 1).to(vae.dtype)).latent_dist.mean
        return latent * self.components.vae_scaling_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        image = vae.decode((latent / self.components.vae_scaling_factor).to(vae.dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixels)

    def prompt_embedding(self, prompt: str):
        if prompt not in self._prompt_cache:
            with torch.no_grad():
                self._prompt_cache[prompt] = self.components.encode_prompt(prompt)
            while len(self._prompt_cache) > 64:
                self._prompt_cache.popitem(last=False)
        return self._prompt_cache[prompt]

    def token_positions(self, label: str, config: G4SegConfig):
        if not isinstance(label, str) or not label.strip():
            raise G4SegError("class name is empty: give the class to refine, e.g. --label cat")
        prompt = config.prompt_for(label.strip())
        embedding = self.prompt_embedding(prompt)
        positions = find_token_positions(embedding.token_ids, self.components.label_token_ids(label.strip()),
                                         label, prompt)
        return prompt, embedding, positions

    @torch.no_grad()
    def unet_x0(self, z0: torch.Tensor, embeddings: Sequence, settings: Sequence[Optional[InjectionSettings]],
                config: G4SegConfig) -> torch.Tensor:
        """Noise z0 [B, ...] to t, one (mask-injected) UNet call, x0 prediction (Eq. 1-2).

        One prompt embedding and one InjectionSettings (None: no injection) per image. Every
        image gets the noise a batch of one would get (seeded by config.seed), so a batch
        reproduces single-image results.
        """
        comps = self.components
        unet = comps.unet
        batch = z0.shape[0]
        if len(embeddings) != batch or len(settings) != batch:
            raise G4SegError(f"{batch} latents but {len(embeddings)} prompts and {len(settings)} masks")
        t = config.timestep
        alpha_bar = alpha_bar_at(comps.alphas_cumprod, t)
        noise = torch.randn(z0[:1].shape, generator=torch.Generator("cpu").manual_seed(config.seed),
                            dtype=torch.float32).repeat(batch, 1, 1, 1).to(z0.device)
        z_t = add_noise(z0.float(), noise, alpha_bar)
        height, width = (s * comps.vae_downsample for s in z0.shape[-2:])
        hidden = torch.cat([e.hidden_states.to(self.device, unet.dtype) for e in embeddings])
        kwargs = _concat_kwargs([comps.unet_kwargs(e, height, width) for e in embeddings])
        latents = z_t
        apply_to = None
        if config.cfg_scale != 1.0:
            negative = self.prompt_embedding(config.negative_prompt)
            hidden = torch.cat([negative.hidden_states.to(hidden).expand(batch, -1, -1), hidden])
            kwargs = _concat_kwargs([comps.unet_kwargs(negative, height, width)] * batch + [kwargs])
            latents = torch.cat([z_t, z_t])
            # uncond rows first, by construction
            apply_to = torch.tensor([False] * batch + [True] * batch, device=self.device)
        timestep = torch.tensor([t] * latents.shape[0], device=self.device)
        call = lambda: unet(latents.to(unet.dtype), timestep, encoder_hidden_states=hidden, **kwargs).sample
        active = [s for s in settings if s is not None and s.mode != "off"]
        if not active:
            out = call()
        else:
            if len(active) != batch:
                raise G4SegError("a batch mixes injected and plain images: refine them in separate batches")
            per_image = settings[0] if batch == 1 else list(settings)
            state = InjectionState(per_image, tuple(z0.shape[-2:]), float(t), apply_to)
            with injected(unet, state):
                out = call()
        out = out.float()
        if config.cfg_scale != 1.0:
            uncond, cond = out.chunk(2)
            out = uncond + config.cfg_scale * (cond - uncond)
        return predict_x0(z_t, out, alpha_bar, comps.prediction_type)

    # ---- the method ---------------------------------------------------------------------
    def prepare_image(self, image, config: G4SegConfig, timings: Optional[dict] = None) -> ImageContext:
        return self.prepare_images([image], config, timings)[0]

    def prepare_images(self, images: Sequence, config: G4SegConfig,
                       timings: Optional[dict] = None) -> List[ImageContext]:
        """VAE latents and CLIP features of the original images, computed as one batch."""
        timings = {} if timings is None else timings
        arrays = [image_to_array(image) for image in images]
        start = time.perf_counter()
        pixels = torch.cat([self.to_pixels(array, config.size) for array in arrays])
        z0 = self.encode(pixels)
        self._sync()
        timings["vae_encode"] = time.perf_counter() - start
        start = time.perf_counter()
        orig_feats = self.features(pixels)
        self._sync()
        timings["clip_original"] = time.perf_counter() - start
        return [ImageContext(pixels[i:i + 1], z0[i:i + 1], orig_feats[i], array.shape[:2])
                for i, array in enumerate(arrays)]

    def prepare_mask(self, mask, size_hw, config: G4SegConfig):
        """Validate, check the size against the image, soften a binary mask: (prob, description)."""
        prob = mask_ops.validate_probability(np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor)
                                                        else mask, dtype=np.float32), name="mask")
        mask_ops.validate_pair(tuple(size_hw), prob.shape)
        return prepare_coarse(prob, config.size, config.soften, config.soften_width)

    def refine(self, image, mask, label: str, config: Optional[G4SegConfig] = None,
               context: Optional[ImageContext] = None) -> RefineResult:
        """Refine one mask; `context` reuses prepare_image's work (several classes of one image)."""
        return self.refine_batch([image], [mask], [label], config,
                                 contexts=None if context is None else [context])[0]

    def refine_batch(self, images: Sequence, masks: Sequence, labels, config: Optional[G4SegConfig] = None,
                     contexts: Optional[Sequence[ImageContext]] = None) -> List[RefineResult]:
        """Refine several (image, mask, label) at once: each model runs once on the whole batch.

        `labels` is one class name for all or one per image. Results equal one-by-one refine()
        calls (same seed per image); every result's timings are the batch's, with batch_size.
        """
        config = (config or G4SegConfig()).validate()
        batch = len(masks)
        labels = [labels] * batch if isinstance(labels, str) else list(labels)
        if batch == 0 or len(images) != batch or len(labels) != batch:
            raise G4SegError(f"refine_batch needs as many images, masks and labels (got {len(images)}, {batch}, "
                             f"{len(labels)}), at least one")
        timings: Dict[str, float] = {}
        total_start = time.perf_counter()
        if contexts is None:
            contexts = self.prepare_images(images, config, timings)
        probs, softenings, prompts, embeddings, positions = [], [], [], [], []
        for mask, label, context in zip(masks, labels, contexts):
            prob, softening = self.prepare_mask(mask, context.size_hw, config)
            prompt, embedding, pos = self.token_positions(label, config)
            for values, value in ((probs, prob), (softenings, softening), (prompts, prompt),
                                  (embeddings, embedding), (positions, pos)):
                values.append(value)

        start = time.perf_counter()
        settings = [InjectionSettings(
            torch.from_numpy(np.ascontiguousarray(
                mask_ops.resize_probability(prob, (config.size, config.size), mode="bilinear"))),
            pos, mode=config.emi_mode, cross_weight=config.cross_weight, self_weight=config.self_weight,
            area_scale=config.area_scale, schedule=config.emi_schedule) for prob, pos in zip(probs, positions)]
        x0 = self.unet_x0(torch.cat([c.z0 for c in contexts]), embeddings, settings, config)
        self._sync()
        timings["unet"] = time.perf_counter() - start

        start = time.perf_counter()
        generated = self.decode(x0)
        self._sync()
        timings["vae_decode"] = time.perf_counter() - start

        start = time.perf_counter()
        gen_feats = self.features(generated)
        self._sync()
        timings["clip_generated"] = time.perf_counter() - start

        start = time.perf_counter()
        refined, matches = [], []
        for i, (context, prob) in enumerate(zip(contexts, probs)):
            match, delta = correspondence_for(context.orig_feats, gen_feats[i], prob.shape, config.direction,
                                              config.correspondence_grid)
            refined.append(mix_foreground(prob, delta.cpu().numpy(), config.beta, config.band,
                                          config.iterations).astype(np.float32))
            matches.append(match.cpu().numpy())
        timings["correspondence_and_mixing"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - total_start
        if batch > 1:
            timings["batch_size"] = batch

        pictures = (generated.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [RefineResult(prob=refined[i], binary=refined[i] >= config.threshold, coarse=probs[i],
                             generated=Image.fromarray(pictures[i]), correspondence=matches[i],
                             timings=dict(timings), softening=softenings[i], label=labels[i], prompt=prompts[i],
                             token_positions=positions[i], config=config) for i in range(batch)]

    def refine_multiclass(self, image, class_masks: Mapping[str, np.ndarray],
                          config: Optional[G4SegConfig] = None,
                          class_indices: Optional[Mapping[str, int]] = None) -> MultiRefineResult:
        """Refine each class against everything else (§III-A), then fuse with a background channel."""
        config = (config or G4SegConfig()).validate()
        if not class_masks:
            raise G4SegError("no class masks given: pass at least one {class name: probability map}")
        indices = dict(class_indices) if class_indices else {name: i + 1 for i, name in enumerate(class_masks)}
        missing = [name for name in class_masks if name not in indices]
        if missing:
            raise G4SegError(f"no class index given for {missing}")
        context = self.prepare_image(image, config)
        results = {name: self.refine(image, m, name, config, context=context) for name, m in class_masks.items()}
        fused = fuse_multiclass({indices[n]: r.prob for n, r in results.items()}, bg_power=config.bg_power)
        return MultiRefineResult(labels=fused, class_indices=indices, results=results)


def _concat_kwargs(parts: Sequence[dict]) -> dict:
    """Batch unet_kwargs dicts along the batch axis (SDXL's added_cond_kwargs hold tensors)."""
    if not parts or not parts[-1]:
        return {}
    out = {}
    for key, last in parts[-1].items():
        if isinstance(last, dict):
            out[key] = {k: torch.cat([p[key][k] for p in parts]) for k in last}
        elif isinstance(last, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        else:
            out[key] = last
    return out
