"""Dense CLIP image features for Semantic Correspondence Alignment (paper §II-C2, §VI).

The whole image is fed at the working size (no centre crop: pixel alignment matters), with
the positional embedding interpolated to the larger patch grid, and every patch token is
projected like CLIP's pooled token, then L2-normalised per location.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import G4SegError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def interpolate_position_grid(pos_patches: torch.Tensor, old_grid: tuple, new_grid: tuple) -> torch.Tensor:
    """Resample learned patch positional embeddings [N, C] from old_grid to new_grid (bicubic)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_patches
    c = pos_patches.shape[-1]
    grid = pos_patches.reshape(1, old_grid[0], old_grid[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], c).to(pos_patches.dtype)


def check_images(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] != 3:
        raise G4SegError(f"CLIP features need RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise G4SegError("image contains NaN or infinite values")
    return images


def open_clip_input_tokens(visual: torch.nn.Module, pixels: torch.Tensor, grid) -> torch.Tensor:
    """Input tokens of an open_clip ViT for a `grid` of patches: class token, then patch embeddings plus the
    learned positions interpolated from the training grid; after ln_pre. [B, 1 + h*w, width]."""
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, h*w, width]
    pos = visual.positional_embedding.to(x.dtype)
    patch_pos = interpolate_position_grid(pos[1:], tuple(visual.grid_size), grid)
    cls_tok = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
    return visual.ln_pre(torch.cat([cls_tok, x + patch_pos[None]], dim=1))


class DenseCLIPFeatures:
    """Callable: images [B, 3, H, W] in [0, 1] -> L2-normalised features [B, C, h, w].

    `tokens_fn(pixels, grid_hw) -> [B, h*w, C]` runs the backbone on normalised pixels.
    """

    def __init__(self, tokens_fn: Callable, patch_size: int, module: torch.nn.Module,
                 input_size: Optional[int] = None, name: str = "clip",
                 mean=CLIP_MEAN, std=CLIP_STD, compute_device=None, compute_dtype=None):
        # compute_device/dtype: for hosts that store weights in one dtype and compute in another
        # (ComfyUI keeps CLIP vision in fp16 and casts per layer to the input's dtype).
        self.compute_device = compute_device
        self.compute_dtype = compute_dtype
        self.tokens_fn = tokens_fn
        self.patch_size = int(patch_size)
        self.module = module
        self.input_size = input_size
        self.name = name
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return torch.device(self.compute_device) if self.compute_device is not None \
            else next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype or next(self.module.parameters()).dtype

    def to(self, device=None, dtype=None) -> "DenseCLIPFeatures":
        self.module.to(device=device, dtype=dtype)
        return self

    def grid_for(self, height: int, width: int) -> tuple:
        """Patch grid used for an image of this size (side rounded to the patch size)."""
        size_h = self.input_size or height
        size_w = self.input_size or width
        return (max(1, round(size_h / self.patch_size)), max(1, round(size_w / self.patch_size)))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images)
        gh, gw = self.grid_for(images.shape[-2], images.shape[-1])
        pixels = F.interpolate(images.float(), size=(gh * self.patch_size, gw * self.patch_size),
                               mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        pixels = (pixels - self.mean.to(pixels.device)) / self.std.to(pixels.device)
        tokens = self.tokens_fn(pixels.to(device=self.device, dtype=self.dtype), (gh, gw))
        feats = tokens.float().transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
        return F.normalize(feats, dim=1)

    @classmethod
    def from_open_clip(cls, visual: torch.nn.Module, name: str = "open_clip") -> "DenseCLIPFeatures":
        """From an open_clip VisionTransformer (`model.visual`)."""
        if not hasattr(visual, "conv1") or not hasattr(visual, "positional_embedding"):
            raise G4SegError(f"{type(visual).__name__} is not an open_clip ViT: G4Seg needs a ViT image "
                             "encoder (ViT-B/16, ViT-L/14, ViT-H/14...), not a ResNet or ConvNeXt CLIP")
        patch = visual.conv1.kernel_size[0]
        visual.eval()

        def tokens_fn(pixels, grid):
            x = open_clip_input_tokens(visual, pixels, grid)
            if getattr(visual.transformer, "batch_first", True):
                x = visual.transformer(x)
            else:
                x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
            x = visual.ln_post(x[:, 1:])
            return x @ visual.proj if visual.proj is not None else x

        return cls(tokens_fn, patch, visual, name=name)

    @classmethod
    def from_transformers(cls, model: torch.nn.Module, name: str = "transformers-clip") -> "DenseCLIPFeatures":
        """From transformers' CLIPVisionModel or CLIPVisionModelWithProjection."""
        vision = getattr(model, "vision_model", None)
        if vision is None or not hasattr(vision, "embeddings"):
            raise G4SegError(f"{type(model).__name__} is not a transformers CLIP vision model")
        projection = getattr(model, "visual_projection", None)
        patch = vision.embeddings.patch_embedding.kernel_size[0]
        model.eval()

        def tokens_fn(pixels, grid):
            out = vision(pixel_values=pixels, interpolate_pos_encoding=True)
            x = vision.post_layernorm(out.last_hidden_state[:, 1:])
            return projection(x) if projection is not None else x

        return cls(tokens_fn, patch, model, name=name)
