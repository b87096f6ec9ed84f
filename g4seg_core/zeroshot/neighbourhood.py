"""NACLIP's last block: dense CLIP patch embeddings that localise (Hajimiri et al., WACV 2025).

A CLIP ViT is trained for one global embedding; its last block mixes every patch with far-away
context, so the patch tokens of the final layer say little about their own place. NACLIP keeps
blocks 0..L-2 as they are and replaces the last block by

    x_L = out_proj( softmax( k kᵀ / √d + Ω ) v ),  k, v from ln_1(x_{L-1}),

per attention head: keys compared with keys (a token attends to tokens that look like it), plus
Ω_ij = exp(-|p_i - p_j|² / (2σ²)) over the 2-D patch positions (σ in patches; 0 on the CLS row
and column), and **no residual connection and no MLP**. Then the post layer-norm, the visual
projection, CLS dropped, L2-normalised per patch. The positional embedding is interpolated
(bicubic) to the patch grid of the input.

The math is here once; each host supplies the parts of its last block (`LastBlock`): open_clip
and transformers below, ComfyUI's CLIP_VISION in `nodes/`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from ..models.clip_features import DenseCLIPFeatures, interpolate_position_grid, open_clip_input_tokens
from ..errors import G4SegError

DEFAULT_SIGMA = 5.0


def neighbourhood_bias(grid_hw: Tuple[int, int], sigma: float = DEFAULT_SIGMA, with_cls: bool = True,
                       device=None, dtype=torch.float32) -> torch.Tensor:
    """Ω: [N(+1), N(+1)] Gaussian of the 2-D distance between patch positions (row-major grid).

    With `with_cls` the first row and column (the CLS token) are 0.
    """
    if not sigma > 0:
        raise G4SegError(f"neighbourhood sigma={sigma}: use a positive width in patches (NACLIP: 5)")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    ys, xs = torch.meshgrid(torch.arange(gh, device=device, dtype=torch.float32),
                            torch.arange(gw, device=device, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # [N, 2]
    omega = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * float(sigma) ** 2))
    if with_cls:
        omega = F.pad(omega, (1, 0, 1, 0))
    return omega.to(dtype)


@dataclass
class LastBlock:
    """What the modified block needs from a ViT's last block (callables on [B, N, width])."""

    norm: Callable  # ln_1 / layer_norm1
    key: Callable  # the key projection (with its bias)
    value: Callable
    out: Callable  # the attention's output projection
    heads: int


def neighbourhood_attention(x: torch.Tensor, block: LastBlock, grid_hw: Tuple[int, int],
                            sigma: float = DEFAULT_SIGMA, with_cls: bool = True) -> torch.Tensor:
    """x_{L-1} [B, (1+)h*w, width] -> out_proj(softmax(k kᵀ/√d + Ω) v): no residual, no MLP."""
    b, n, width = x.shape
    if n != int(grid_hw[0]) * int(grid_hw[1]) + int(with_cls):
        raise G4SegError(f"internal: {n} tokens do not fit a {grid_hw} patch grid")
    if width % block.heads:
        raise G4SegError(f"internal: width {width} is not divisible by {block.heads} heads")
    h = block.norm(x)
    k = block.key(h).reshape(b, n, block.heads, -1).transpose(1, 2)  # [B, heads, N, d]
    v = block.value(h).reshape(b, n, block.heads, -1).transpose(1, 2)
    omega = neighbourhood_bias(grid_hw, sigma, with_cls, device=x.device, dtype=k.dtype)
    # SDPA computes softmax(q kᵀ · scale + mask) v; with q = k it is the keys-against-keys attention
    attended = F.scaled_dot_product_attention(k, k, v, attn_mask=omega)
    return block.out(attended.transpose(1, 2).reshape(b, n, width))


def _split_in_proj(attn: torch.nn.MultiheadAttention) -> Tuple[Callable, Callable]:
    """Key and value projections of a torch MultiheadAttention with a packed in_proj."""
    if getattr(attn, "in_proj_weight", None) is None:
        raise G4SegError("this open_clip ViT has separate q/k/v weights; NACLIP's block needs a packed in_proj")
    width = attn.embed_dim

    def part(i):
        def project(h):
            weight = attn.in_proj_weight[i * width:(i + 1) * width]
            bias = attn.in_proj_bias[i * width:(i + 1) * width] if attn.in_proj_bias is not None else None
            return F.linear(h, weight.to(h.dtype), bias.to(h.dtype) if bias is not None else None)
        return project

    return part(1), part(2)


def from_open_clip(visual: torch.nn.Module, sigma: float = DEFAULT_SIGMA,
                   name: str = "open_clip") -> DenseCLIPFeatures:
    """NACLIP patch embeddings of an open_clip VisionTransformer (`model.visual`)."""
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise G4SegError(f"{type(visual).__name__} is not an open_clip ViT: zero-shot segmentation needs a ViT "
                         "image encoder (ViT-B/16, ViT-L/14, ViT-H/14, ViT-bigG/14)")
    blocks = list(visual.transformer.resblocks)
    last = blocks[-1]
    key, value = _split_in_proj(last.attn)
    block = LastBlock(norm=last.ln_1, key=key, value=value, out=last.attn.out_proj, heads=last.attn.num_heads)
    patch = visual.conv1.kernel_size[0]
    batch_first = getattr(visual.transformer, "batch_first", True)
    visual.eval()

    def tokens_fn(pixels, grid):
        x = open_clip_input_tokens(visual, pixels, grid)
        for resblock in blocks[:-1]:
            x = resblock(x) if batch_first else resblock(x.transpose(0, 1)).transpose(0, 1)
        x = visual.ln_post(neighbourhood_attention(x, block, grid, sigma))
        x = x[:, 1:]
        return x @ visual.proj if visual.proj is not None else x

    return DenseCLIPFeatures(tokens_fn, patch, visual, name=f"{name}, NACLIP last block (sigma {sigma:g})")


def from_transformers(model: torch.nn.Module, sigma: float = DEFAULT_SIGMA,
                      name: str = "transformers-clip") -> DenseCLIPFeatures:
    """NACLIP patch embeddings of a transformers CLIPVisionModel[WithProjection] (ComfyUI's clip_vision files)."""
    vision = getattr(model, "vision_model", None)
    if vision is None or not hasattr(vision, "embeddings"):
        raise G4SegError(f"{type(model).__name__} is not a transformers CLIP vision model")
    layers = list(vision.encoder.layers)
    last = layers[-1]
    attn = last.self_attn
    block = LastBlock(norm=last.layer_norm1, key=attn.k_proj, value=attn.v_proj, out=attn.out_proj,
                      heads=attn.num_heads)
    emb = vision.embeddings
    patch = emb.patch_embedding.kernel_size[0]
    side = int(round((emb.position_embedding.weight.shape[0] - 1) ** 0.5))
    projection = getattr(model, "visual_projection", None)
    # transformers 4.x layers also take a causal mask argument; 5.x only the attention mask
    params = inspect.signature(last.forward).parameters
    mask_kwargs = {"attention_mask": None}
    if "causal_attention_mask" in params:
        mask_kwargs["causal_attention_mask"] = None
    model.eval()

    def tokens_fn(pixels, grid):
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        pos = emb.position_embedding.weight.to(x.dtype)
        patch_pos = interpolate_position_grid(pos[1:], (side, side), grid)
        cls_tok = (emb.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = vision.pre_layrnorm(torch.cat([cls_tok, x + patch_pos[None]], dim=1))
        for layer in layers[:-1]:
            out = layer(x, **mask_kwargs)
            x = out[0] if isinstance(out, tuple) else out
        x = vision.post_layernorm(neighbourhood_attention(x, block, grid, sigma))[:, 1:]
        return projection(x) if projection is not None else x

    return DenseCLIPFeatures(tokens_fn, patch, model, name=f"{name}, NACLIP last block (sigma {sigma:g})")


def neighbourhood_features(features: DenseCLIPFeatures, sigma: float = DEFAULT_SIGMA) -> DenseCLIPFeatures:
    """The NACLIP version of an existing DenseCLIPFeatures (same weights, same host module)."""
    module = features.module
    if hasattr(module, "conv1") and hasattr(module, "transformer"):
        out = from_open_clip(module, sigma, name=features.name)
    elif hasattr(module, "vision_model"):
        out = from_transformers(module, sigma, name=features.name)
    else:
        raise G4SegError(f"cannot build NACLIP features from {type(module).__name__}: give an open_clip or "
                         "transformers CLIP ViT")
    out.compute_device, out.compute_dtype = features.compute_device, features.compute_dtype
    out.mean, out.std = features.mean, features.std
    return out
