"""Tiny random-weight models built from config: the CLI's offline self-check and every test.

They have the real structure of each family (cross-attention at two token grids, a VAE
that downsamples by 8 like SD's, SDXL's two text encoders and text_time conditioning,
the real 49408-token vocabulary) at widths of 8..64, so a 64..128 px refinement runs in
well under a second on a CPU. Their outputs are meaningless: they check plumbing only.
"""

from __future__ import annotations

from typing import Optional

import torch

TINY_TEXT_WIDTH = 32


def _tiny_text(hidden_act: str, with_projection: bool = False) -> dict:
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "vocab_size": 49408, "hidden_size": TINY_TEXT_WIDTH, "intermediate_size": 64, "projection_dim": TINY_TEXT_WIDTH,
        "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
        "hidden_act": hidden_act, "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
    }


def tiny_configs(family: str = "sd21") -> dict:
    """{"unet", "vae", "text_encoders"} config dicts of the tiny models of a family.

    Also what tests pass as `configs=` to load tiny single-file checkpoints.
    """
    from .families import normalize_family

    family = normalize_family(family)
    sdxl = family == "sdxl"
    if family == "sd15":
        texts = [_tiny_text("quick_gelu")]  # OpenAI CLIP-L
    elif sdxl:
        texts = [_tiny_text("quick_gelu"), _tiny_text("gelu", with_projection=True)]  # CLIP-L + OpenCLIP bigG
    else:
        texts = [_tiny_text("gelu")]  # OpenCLIP ViT-H
    context = TINY_TEXT_WIDTH * len(texts)
    unet = {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
        "block_out_channels": [32, 64],
        # cross-attention at both levels: two token grids (latent and latent/2)
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "attention_head_dim": 2, "norm_num_groups": 8, "cross_attention_dim": context,
        "use_linear_projection": family != "sd15",  # SD1 uses 1x1 convs around its transformers, SD2/XL linears
        "transformer_layers_per_block": 1,
    }
    if sdxl:
        unet.update({"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                     "projection_class_embeddings_input_dim": TINY_TEXT_WIDTH + 6 * 8})
    vae = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
        # four levels: downsamples by 8 like SD's VAE
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "norm_num_groups": 8, "sample_size": 64,
        "scaling_factor": 0.13025 if sdxl else 0.18215, "force_upcast": sdxl,
    }
    return {"unet": unet, "vae": vae, "text_encoders": texts}


def tiny_sd_components(family: str = "sd21", prediction_type: Optional[str] = None, seed: int = 0):
    """Tiny random SDComponents of a family ("sd15", "sd21", "sd21v", "sdxl"); deterministic per seed.

    prediction_type None takes the family's (epsilon); "sd21v" is always v_prediction, and
    family "sd21" with prediction_type "v_prediction" becomes "sd21v". The global torch RNG is
    left untouched.
    """
    from .components import components_from_configs
    from .families import normalize_family

    family = normalize_family(family)
    if family == "sd21v":  # the family names the v-model; it wins over a default "epsilon" passed along
        prediction_type = "v_prediction"
    elif family == "sd21" and prediction_type == "v_prediction":
        family = "sd21v"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return components_from_configs(tiny_configs(family), family, prediction_type or "epsilon")


def tiny_clip_features(seed: int = 0):
    """Dense CLIP features from a tiny random open_clip ViT (patch 16, width 32, 2 layers)."""
    from open_clip.transformer import VisionTransformer

    from .clip_features import DenseCLIPFeatures

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = VisionTransformer(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                   output_dim=16)
    return DenseCLIPFeatures.from_open_clip(visual.eval(), name="tiny open_clip ViT (random)")


def tiny_text_to_mask(seed: int = 0, sigma: Optional[float] = None):
    """(NACLIP features, text tower) of a tiny random open_clip CLIP (16-wide embeddings, 2 layers each); `sigma`:
    the neighbourhood width (default NACLIP's), as for real weights."""
    from open_clip.transformer import TextTransformer, VisionTransformer

    from ..zeroshot.neighbourhood import from_open_clip
    from ..zeroshot.text import OpenCLIPTextTower

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual = VisionTransformer(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0,
                                   output_dim=16)
        text = TextTransformer(width=32, heads=2, layers=2, mlp_ratio=2.0, output_dim=16)
    return (from_open_clip(visual.eval(), **({} if sigma is None else {"sigma": sigma}),
                           name="tiny open_clip ViT (random)"),
            OpenCLIPTextTower(text.eval(), name="tiny open_clip text (random)"))
