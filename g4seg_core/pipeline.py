"""G4SegPipeline: the diffusers backend of flow.py (diffusers UNet/VAE/text encoders + a CLIP image encoder).

refine(image, mask, label, config) -> RefineResult runs flow.refine_batch on this backend, the
same orchestration the ComfyUI node runs on ComfyUI's models. Each backend stage is a method
so the benchmark can time the bare model passes against the end-to-end path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Mapping, Optional, Sequence

import numpy as np
import torch

from .method import flow
from .config import G4SegConfig
from .models.diffusers_patch import InjectionState, injected
from .errors import G4SegError
from .method.flow import ImageContext, RefineResult
from .method.injection import InjectionBatch
from .method.multiclass import ClassRefinement, refine_classes
from .loading.precision import default_device, resolve_dtype, vae_channels_last
from .method.schedule import add_noise, alpha_bar_at, predict_x0
from .method.tokens import find_token_positions


class G4SegPipeline:
    def __init__(self, components, clip, device: Optional[str] = None, dtype="auto"):
        """`dtype`: "auto" (precision.resolve_dtype), a dtype name or a torch dtype; `dtype_reason` says why."""
        self.device = torch.device(default_device(device))
        choice = resolve_dtype(dtype, self.device, components.family)
        self.dtype, self.dtype_reason = choice.dtype, choice.reason
        self.components = components.to(self.device, self.dtype)
        if vae_channels_last(self.device):
            self.components.vae.to(memory_format=torch.channels_last)
        self.clip = clip.to(self.device, self.dtype)
        self._prompt_cache: "OrderedDict[str, object]" = OrderedDict()
        self.compiled: List[str] = []  # parts compiled by compile() (models/compiled.py)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint=None, clip=None, comfyui_dir=None, family=None,
                        device=None, dtype="auto") -> "G4SegPipeline":
        """Load from files on disk (never downloads); see model_files for the search order."""
        from .loading.clip_loading import load_clip_vision
        from .loading.sd_loading import load_sd_components
        from .loading.model_files import find_checkpoint, find_clip_vision

        device = default_device(device)
        chosen = [resolve_dtype(dtype, device)]  # before the files are read: a wrong choice fails first

        def load_dtype(detected_family: str) -> torch.dtype:
            if dtype in (None, "auto"):  # auto may depend on the family (SDXL on GPUs): cast the weights once
                chosen[0] = resolve_dtype(dtype, device, detected_family)
            return chosen[0].dtype

        ckpt = find_checkpoint(checkpoint, comfyui_dir)
        clip_path = find_clip_vision(clip, comfyui_dir)
        components = load_sd_components(ckpt, family=family, dtype=load_dtype, device="cpu")
        clip_model = load_clip_vision(clip_path, device="cpu")
        return cls(components, clip_model, device=device, dtype=chosen[0])

    @classmethod
    def tiny(cls, family: str = "sd21", prediction_type: str = "epsilon", seed: int = 0,
             device: str = "cpu", dtype="float32") -> "G4SegPipeline":
        """Random-weight tiny models: checks the installation and the plumbing, not the result."""
        from .models.tiny import tiny_clip_features, tiny_sd_components

        return cls(tiny_sd_components(family=family, prediction_type=prediction_type, seed=seed),
                   tiny_clip_features(seed=seed), device=device, dtype=dtype)

    def compile(self, backend: str = "inductor") -> List[str]:
        """--compile: the VAE and CLIP image tower through torch.compile with CUDA graphs (CUDA only;
        models/compiled.py says what is compiled and why the UNet is not). Returns the parts compiled."""
        from .models.compiled import check_device, compile_models

        if backend == "inductor":
            check_device(self.device)
        if not self.compiled:
            self.compiled = compile_models(self.components, self.clip, backend=backend)
        return self.compiled

    # ---- the backend interface of flow.py ---------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def to_pixels(self, image, size: int) -> torch.Tensor:
        """Image -> [1, 3, size, size] in [0, 1] on the device (flow's resize: antialiased bicubic, no crop)."""
        return flow.resize_image(flow.image_to_tensor(image, self.device)[None], (size, size))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        latent = vae.encode((pixels.to(self.device) * 2 - 1).to(vae.dtype)).latent_dist.mean
        return latent.float() * self.components.vae_scaling_factor  # latents between stages stay float32

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        image = vae.decode((latent / self.components.vae_scaling_factor).to(vae.dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, kind: str = "last_layer") -> torch.Tensor:
        if kind == "naclip":  # the same weights with NACLIP's last block, built once
            if getattr(self, "_naclip", None) is None:
                from .zeroshot.neighbourhood import neighbourhood_features

                self._naclip = neighbourhood_features(self.clip)
            return self._naclip(pixels.to(self.device))
        return self.clip(pixels.to(self.device))

    def prompt_embedding(self, prompt: str):
        if prompt not in self._prompt_cache:
            with torch.no_grad():
                self._prompt_cache[prompt] = self.components.encode_prompt(prompt)
            while len(self._prompt_cache) > 64:
                self._prompt_cache.popitem(last=False)
        return self._prompt_cache[prompt]

    def prompt(self, prompt: str, label: Optional[str], occurrences: int = 1):
        embedding = self.prompt_embedding(prompt)
        if label is None:
            return embedding, []
        return embedding, find_token_positions(embedding.token_ids, self.components.label_token_ids(label),
                                               label, prompt, occurrences=occurrences)

    def token_positions(self, label: str, config: G4SegConfig):
        """(prompt, embedding, class-token positions) of a class name in config's template."""
        label = flow.check_label(label)
        prompt = config.prompt_for(label)
        embedding, positions = self.prompt(prompt, label, occurrences=config.prompt_template.count("{}"))
        return prompt, embedding, positions

    @torch.no_grad()
    def denoise(self, z0: torch.Tensor, noise: torch.Tensor, embeddings: Sequence,
                injection: Optional[InjectionBatch], config: G4SegConfig, negative=None) -> torch.Tensor:
        """Noise z0 [B, ...] to t with `noise`, one (mask-injected) UNet call, x0 prediction (Eq. 1-2).

        One prompt embedding per image (different class names share the call); `injection` holds a
        mask and class tokens per image (None or mode off: no injection).
        """
        comps = self.components
        unet = comps.unet
        batch = z0.shape[0]
        if len(embeddings) != batch or (injection is not None and len(injection) != batch):
            raise G4SegError(f"{batch} latents but {len(embeddings)} prompts and "
                             f"{len(injection) if injection is not None else 0} masks")
        t = config.timestep
        alpha_bar = alpha_bar_at(comps.alphas_cumprod, t)
        z_t = add_noise(z0.float(), noise.to(z0.device), alpha_bar)
        height, width = (s * comps.vae_downsample for s in z0.shape[-2:])
        hidden = torch.cat([e.hidden_states.to(self.device, unet.dtype) for e in embeddings])
        kwargs = concat_unet_kwargs([comps.unet_kwargs(e, height, width) for e in embeddings])
        latents = z_t
        apply_to = None
        if config.cfg_scale != 1.0:
            if negative is None:
                raise G4SegError("internal: CFG needs the negative prompt's embedding")
            hidden = torch.cat([negative.hidden_states.to(hidden).expand(batch, -1, -1), hidden])
            kwargs = concat_unet_kwargs([comps.unet_kwargs(negative, height, width)] * batch + [kwargs])
            latents = torch.cat([z_t, z_t])
            apply_to = [False] * batch + [True] * batch  # uncond rows first, by construction
        timestep = torch.full((latents.shape[0],), t, device=self.device)
        call = lambda: unet(latents.to(unet.dtype), timestep, encoder_hidden_states=hidden, **kwargs).sample
        if injection is None or not injection.active:
            out = call()
        else:
            with injected(unet, InjectionState(injection, tuple(z0.shape[-2:]), float(t), apply_to)):
                out = call()
        out = out.float()
        if config.cfg_scale != 1.0:
            uncond, cond = out.chunk(2)
            out = uncond + config.cfg_scale * (cond - uncond)
        return predict_x0(z_t, out, alpha_bar, comps.prediction_type)

    # ---- the method (flow.py) ---------------------------------------------------------------
    def prepare_image(self, image, config: G4SegConfig, timings: Optional[dict] = None) -> ImageContext:
        return flow.prepare_images(self, [image], config.validate(), timings)[0]

    def refine(self, image, mask, label: str, config: Optional[G4SegConfig] = None,
               context: Optional[ImageContext] = None) -> RefineResult:
        """Refine one mask; `context` reuses prepare_image's work (several classes of one image)."""
        return self.refine_batch([image], [mask], [label], config,
                                 contexts=None if context is None else [context])[0]

    def refine_batch(self, images: Sequence, masks: Sequence, labels, config: Optional[G4SegConfig] = None,
                     contexts: Optional[Sequence[ImageContext]] = None) -> List[RefineResult]:
        """flow.refine_batch on this backend: each model runs once on the whole batch (image i: seed + i)."""
        return flow.refine_batch(self, images, masks, labels, config, contexts)

    def refine_classes(self, image, masks: Mapping[str, np.ndarray], config: Optional[G4SegConfig] = None,
                       class_indices: Optional[Mapping[str, int]] = None) -> ClassRefinement:
        """Several classes of one image: multiclass.refine_classes on this backend (its rule picks the classes)."""
        return refine_classes(self, image, masks, config, class_indices)


def concat_unet_kwargs(parts: Sequence[dict]) -> dict:
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
