"""Everything ComfyUI-specific in one place: flow.Backend on ComfyUI's MODEL, CLIP, VAE and CLIP_VISION.

ComfyBackend runs the method's stages with ComfyUI's own objects so that G4SegRefine is
g4seg_core.method.flow.refine_batch, the orchestration `g4seg refine` runs on diffusers models:
  encode / decode: the VAE object ([B, H, W, C] pixels, ComfyUI's latent space);
  prompt: CLIP.tokenize / encode_from_tokens, class-token positions from the tokenizers' ids;
  denoise: the attention patch (attention_patch.py) and one Euler step from sigma(t) to 0 through
    comfy.sample.sample_custom, so ControlNet, hooks, CFG and v-prediction work as ComfyUI does;
  features: ComfyUI's CLIP vision transformer on the full image (positional embedding interpolated).
Every `comfy` import is inside a function: the module (and tests with stand-in objects) runs
without ComfyUI.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from g4seg_core.models.clip_features import CLIP_MEAN, CLIP_STD, DenseCLIPFeatures, interpolate_position_grid
from g4seg_core.config import G4SegConfig
from g4seg_core.errors import G4SegError
from g4seg_core.method.injection import InjectionBatch, plain_attention
from g4seg_core.loading.precision import compute_dtype_for_storage

from . import attention_patch
from ..common import escape_prompt


def class_token_positions(clip, prompt: str, class_name: str, occurrences: int = 1) -> Tuple[dict, List[int]]:
    """Tokenize with the CLIP object's own tokenizer(s); positions of the class name's tokens
    (all of them when the template has `occurrences` > 1 '{}')."""
    tokens = clip.tokenize(escape_prompt(prompt))
    label_tokens = clip.tokenize(escape_prompt(class_name))
    empty_tokens = clip.tokenize("")
    positions = attention_patch.label_positions_from_tokens(tokens, label_tokens, empty_tokens, class_name, prompt,
                                                            occurrences=occurrences)
    return tokens, positions


def encode_tokens(clip, tokens) -> list:
    """CONDITIONING from tokens (as CLIPTextEncode does)."""
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sigma_for_timestep(model_sampling, timestep: int) -> float:
    """The model's own k-diffusion sigma of DDPM step t (e.g. 1.1644 at t=400 for SD)."""
    if not hasattr(model_sampling, "sigma"):
        raise G4SegError("this model has no discrete noise schedule (model_sampling.sigma): "
                         f"{attention_patch.SUPPORTED_FAMILIES} are supported")
    return float(model_sampling.sigma(torch.tensor(float(timestep))).flatten()[0])


def zero_conditioning(positive):
    """A zeroed copy of the positive conditioning (used when no negative is connected)."""
    out = []
    for cond, extra in positive:
        extra = dict(extra)
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(cond), extra])
    return out


def _sdpa_attention(q, k, v, heads, mask=None, **kwargs):
    """ComfyUI's attention-function signature on PyTorch SDPA (ComfyUI's --cpu default einsum is slow)."""
    return plain_attention(q, k, v, heads)


def run_layers(layers, x):
    """ComfyUI CLIP encoder layers, one by one, with SDPA attention."""
    for layer in layers:
        x = layer(x, None, _sdpa_attention)
    return x


def _run_encoder(encoder, x):
    """The CLIP encoder layer by layer with SDPA attention; the encoder's own forward if its layout differs."""
    layers = getattr(encoder, "layers", None)
    if layers is None:
        return encoder(x, mask=None, intermediate_output=None)[0]
    return run_layers(layers, x)


def embed_patches(vision, pixels: torch.Tensor, grid, side: int, has_cls: bool) -> torch.Tensor:
    """Input tokens of ComfyUI's CLIP vision transformer for a `grid` of patches: patch embeddings plus the
    learned positions interpolated from `side` x `side` (class token first when there is one), pre-norm."""
    import comfy.ops

    emb = vision.embeddings
    x = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    pos = comfy.ops.cast_to_input(emb.position_embedding.weight, x)
    x = x + interpolate_position_grid(pos[1:] if has_cls else pos, (side, side), tuple(grid))[None]
    if has_cls:
        cls_tok = comfy.ops.cast_to_input(emb.class_embedding, x) + pos[0]
        x = torch.cat([cls_tok.expand(x.shape[0], 1, -1), x], dim=1)
    return vision.pre_layrnorm(x)


def comfy_clip_vision_features(clip_vision) -> DenseCLIPFeatures:
    """DenseCLIPFeatures running ComfyUI's own CLIP vision transformer on the full image.

    Patch tokens of the last layer -> post_layernorm -> visual_projection, with the learned
    positional embedding interpolated to the image's patch grid (no centre crop).
    """
    outer = getattr(clip_vision, "model", None)
    vision = getattr(outer, "vision_model", None)
    emb = getattr(vision, "embeddings", None)
    if emb is None or not hasattr(emb, "patch_embedding") or not hasattr(emb, "position_embedding"):
        raise G4SegError("this CLIP_VISION model is not a CLIP/SigLIP ViT (e.g. a DINOv2 or other encoder): "
                         "load a CLIP ViT with CLIPVisionLoader (ViT-L/14, ViT-H/14, ViT-bigG/14)")
    import comfy.model_management as mm

    patch = emb.patch_embedding.kernel_size[0]
    has_cls = getattr(emb, "class_embedding", None) is not None
    n_pos = emb.position_embedding.weight.shape[0] - (1 if has_cls else 0)
    side = int(round(n_pos ** 0.5))
    if side * side != n_pos:
        raise G4SegError(f"CLIP vision positional embedding has {n_pos} patch positions, not a square grid")
    projection = getattr(outer, "visual_projection", None)
    output_layernorm = bool(getattr(vision, "output_layernorm", False))

    def tokens_fn(pixels, grid):
        x = _run_encoder(vision.encoder, embed_patches(vision, pixels, grid, side, has_cls))
        if has_cls:
            x = x[:, 1:]
        x = vision.post_layernorm(x)
        if projection is not None and callable(projection) and not output_layernorm:
            x = projection(x)
        return x

    mean = getattr(clip_vision, "image_mean", None) or CLIP_MEAN
    std = getattr(clip_vision, "image_std", None) or CLIP_STD
    mm.load_model_gpu(clip_vision.patcher)
    # ComfyUI's manual-cast layers compute in the input's dtype. Its CPU default stores CLIP vision in
    # fp16, which is very slow to compute in on a CPU: fp32 inputs then, as ComfyUI's own encode_image.
    # Stored in bf16 (--bf16-text-enc) on a CPU with native bf16, or fp16/bf16 on a GPU: that dtype.
    device = getattr(clip_vision, "load_device", None)
    compute = compute_dtype_for_storage(getattr(clip_vision, "dtype", torch.float32),
                                        device if device is not None else next(outer.parameters()).device)
    return DenseCLIPFeatures(tokens_fn, patch, outer, name="comfy-clip-vision", mean=mean, std=std,
                             compute_device=device, compute_dtype=compute)


def sample_one_step(model, positive, negative, samples: torch.Tensor, noise: torch.Tensor, timestep: int,
                    cfg: float, seed: int, noise_mask=None) -> torch.Tensor:
    """x0 in one model call: noise to sigma(t) (the model's own schedule), one Euler step to sigma 0."""
    import comfy.sample
    import comfy.samplers

    attention_patch.model_family(model)
    sigma = sigma_for_timestep(model.get_model_object("model_sampling"), int(timestep))
    samples = comfy.sample.fix_empty_latent_channels(model, samples)
    if negative is None:
        negative = zero_conditioning(positive)
    sigmas = torch.tensor([sigma, 0.0], dtype=torch.float32)
    sampler = comfy.samplers.sampler_object("euler")
    return comfy.sample.sample_custom(model, noise, float(cfg), sampler, sigmas, positive, negative, samples,
                                      noise_mask=noise_mask, disable_pbar=True, seed=int(seed))


class ComfyBackend:
    """g4seg_core.method.flow.Backend on ComfyUI's MODEL, CLIP, VAE and CLIP_VISION (see the module docstring)."""

    def __init__(self, model, clip, vae, clip_vision=None, extractor=None):
        attention_patch.model_family(model)  # fail early on unsupported models
        self.model, self.clip, self.vae, self.clip_vision = model, clip, vae, clip_vision
        self.extractor = extractor if extractor is not None else comfy_clip_vision_features(clip_vision)

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.permute(0, 2, 3, 1).cpu())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents).float()
        if images.dim() == 5:  # some VAEs return [B, T, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        return images.permute(0, 3, 1, 2).cpu().clamp(0, 1)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, kind: str = "last_layer") -> torch.Tensor:
        extractor = self.extractor
        if kind == "naclip":  # NACLIP's last block on the same CLIP_VISION (nodes/comfy/zeroshot.py), built once
            if getattr(self, "_naclip", None) is None:
                from .zeroshot import comfy_naclip_features

                if self.clip_vision is None:
                    raise G4SegError("clip_features 'naclip' needs a CLIP_VISION model")
                self._naclip = comfy_naclip_features(self.clip_vision)
            extractor = self._naclip
        return extractor(pixels.clamp(0, 1)).float().cpu()

    def prompt(self, prompt: str, label: Optional[str], occurrences: int = 1) -> Tuple[list, List[int]]:
        if label is None:
            return encode_tokens(self.clip, self.clip.tokenize(escape_prompt(prompt))), []
        tokens, positions = class_token_positions(self.clip, prompt, label, occurrences=occurrences)
        return encode_tokens(self.clip, tokens), positions

    def denoise(self, latents: torch.Tensor, noise: torch.Tensor, prompts: Sequence,
                injection: Optional[InjectionBatch], config: G4SegConfig, negative=None) -> torch.Tensor:
        """One sampling call for the whole batch: rows with different prompts (class names) go in as the rows
        of one batched CONDITIONING (batched_conditioning); only prompts that cannot be stacked are sampled
        apart."""
        out = torch.empty_like(latents)
        for rows, positive in batched_conditioning(prompts):
            model = self.model
            if injection is not None and injection.active:
                part = injection if len(rows) == len(prompts) else injection.select(rows)
                model, _, _ = attention_patch.inject(self.model, part)
            index = torch.tensor(rows)
            x0 = sample_one_step(model, positive, negative, latents[index], noise[index], config.timestep,
                                 config.cfg_scale, config.seed)
            out[index] = x0.to(out.dtype)
        return out


def batched_conditioning(prompts: Sequence) -> List[Tuple[List[int], list]]:
    """[(rows, CONDITIONING)] covering every row of a batch, as few groups as possible.

    ComfyUI uses a conditioning tensor of batch n as the per-row conditioning of n latents (one row
    each), so rows with different prompts share one sampling call: their one-entry CONDITIONINGs are
    stacked along the batch (the cond tensor and every per-prompt tensor such as SDXL's pooled output).
    Rows whose prompts differ in token length or carry other settings are grouped apart.
    """
    if all(p is prompts[0] for p in prompts):
        return [(list(range(len(prompts))), prompts[0])]
    groups: dict = {}
    for row, prompt in enumerate(prompts):
        groups.setdefault(_stack_key(prompt, row), []).append(row)
    out = []
    for rows in groups.values():
        first = prompts[rows[0]]
        if len(rows) == 1 or all(prompts[r] is first for r in rows):
            out.append((rows, first))
            continue
        cond = torch.cat([prompts[r][0][0] for r in rows])
        extra = {}
        for key, value in first[0][1].items():
            values = [prompts[r][0][1][key] for r in rows]
            extra[key] = torch.cat(values) if torch.is_tensor(value) else value
        out.append((rows, [[cond, extra]]))
    return out


def _stack_key(prompt, row: int):
    """Rows with equal keys stack into one CONDITIONING: one entry, cond [1, T, C] of one shape, per-prompt
    tensors of batch 1, the same other settings. Anything else gets its own group (the row number)."""
    if not (isinstance(prompt, list) and len(prompt) == 1 and torch.is_tensor(prompt[0][0])
            and prompt[0][0].shape[0] == 1 and isinstance(prompt[0][1], dict)):
        return ("alone", row)
    cond, extra = prompt[0]
    key = [tuple(cond.shape), cond.dtype, str(cond.device)]
    for name in sorted(extra):
        value = extra[name]
        if torch.is_tensor(value):
            if value.dim() == 0 or value.shape[0] != 1:
                return ("alone", row)
            key.append((name, tuple(value.shape), value.dtype, str(value.device)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            key.append((name, value))
        else:
            return ("alone", row)  # hooks, control and the like: not stacked
    return tuple(key)
