"""ComfyUI's CLIP_VISION as dense CLIP features, of either kind (config.CLIP_FEATURE_MODES), in one builder.

"last_layer": the patch tokens of the last layer (paper §II-C2); "naclip": NACLIP's last block
(the math is g4seg_core.zeroshot.neighbourhood; only the parts of ComfyUI's last layer are picked
here). Both run ComfyUI's own transformer on the full image with the learned positions
interpolated to the image's patch grid (no centre crop). No ComfyUI import at module level.
"""

from __future__ import annotations

import torch

from g4seg_core.errors import G4SegError
from g4seg_core.loading.precision import compute_dtype_for_storage
from g4seg_core.method.injection import plain_attention
from g4seg_core.models.clip_features import CLIP_MEAN, CLIP_STD, DenseCLIPFeatures, interpolate_position_grid
from g4seg_core.zeroshot.neighbourhood import DEFAULT_SIGMA, LastBlock, neighbourhood_attention

NOT_CLIP = ("this CLIP_VISION model is not a CLIP/SigLIP ViT (e.g. a DINOv2 or other encoder): load a CLIP ViT "
            "with CLIPVisionLoader (ViT-L/14, ViT-H/14, ViT-bigG/14)")
NOT_NACLIP = ("this CLIP_VISION model is not a CLIP ViT with a class token and a projection (SigLIP, DINOv2 and "
              "others are not): load clip_vision_h.safetensors (SD2.x) or clip_vision_g.safetensors (SDXL) with "
              "CLIPVisionLoader")


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


def comfy_clip_vision_features(clip_vision, kind: str = "last_layer", sigma: float = DEFAULT_SIGMA) -> DenseCLIPFeatures:
    """DenseCLIPFeatures running ComfyUI's own CLIP vision transformer on the full image.

    kind "last_layer": patch tokens of the last layer -> post_layernorm -> visual_projection.
    kind "naclip": layers 0..L-2, NACLIP's last block (no residual, no MLP, `sigma` in patches) ->
    post_layernorm -> visual_projection; needs a class token and a projection. Learned positions
    are interpolated to the image's patch grid (no centre crop).
    """
    if kind not in ("last_layer", "naclip"):
        raise G4SegError(f"internal: unknown CLIP feature kind {kind!r}")
    outer = getattr(clip_vision, "model", None)
    vision = getattr(outer, "vision_model", None)
    emb = getattr(vision, "embeddings", None)
    if emb is None or not hasattr(emb, "patch_embedding") or not hasattr(emb, "position_embedding"):
        raise G4SegError(NOT_CLIP if kind == "last_layer" else NOT_NACLIP)
    import comfy.model_management as mm

    patch = emb.patch_embedding.kernel_size[0]
    has_cls = getattr(emb, "class_embedding", None) is not None
    n_pos = emb.position_embedding.weight.shape[0] - (1 if has_cls else 0)
    side = int(round(n_pos ** 0.5))
    if side * side != n_pos:
        raise G4SegError(f"CLIP vision positional embedding has {n_pos} patch positions, not a square grid")
    projection = getattr(outer, "visual_projection", None)
    output_layernorm = bool(getattr(vision, "output_layernorm", False))

    if kind == "naclip":
        layers = getattr(getattr(vision, "encoder", None), "layers", None)
        if layers is None or not has_cls or getattr(projection, "weight", None) is None or output_layernorm:
            raise G4SegError(NOT_NACLIP)
        last = layers[-1]
        attn = last.self_attn
        block = LastBlock(norm=last.layer_norm1, key=attn.k_proj, value=attn.v_proj, out=attn.out_proj,
                          heads=attn.heads)

        def tokens_fn(pixels, grid):
            x = run_layers(layers[:-1], embed_patches(vision, pixels, grid, side, has_cls=True))
            x = vision.post_layernorm(neighbourhood_attention(x, block, tuple(grid), sigma))[:, 1:]
            return projection(x)
    else:
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
    device = getattr(clip_vision, "load_device", None)
    if kind == "naclip":
        name, compute = f"ComfyUI CLIP_VISION, NACLIP last block (sigma {sigma:g})", torch.float32
    else:
        # ComfyUI's manual-cast layers compute in the input's dtype. Its CPU default stores CLIP vision in
        # fp16, which is very slow to compute in on a CPU: fp32 inputs then, as ComfyUI's own encode_image.
        # Stored in bf16 (--bf16-text-enc) on a CPU with native bf16, or fp16/bf16 on a GPU: that dtype.
        name = "comfy-clip-vision"
        compute = compute_dtype_for_storage(getattr(clip_vision, "dtype", torch.float32),
                                            device if device is not None else next(outer.parameters()).device)
    features = DenseCLIPFeatures(tokens_fn, patch, outer, name=name, mean=mean, std=std, compute_device=device,
                                 compute_dtype=compute)
    if getattr(projection, "weight", None) is not None:
        features.width = int(projection.weight.shape[0])
    return features
