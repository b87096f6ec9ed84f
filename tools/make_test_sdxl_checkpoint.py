"""Write a random-weight, full-size SDXL checkpoint that ComfyUI loads as SDXL (for the opt-in SDXL test).

    COMFYUI_PATH=/work/ComfyUI flock /work/heavy.lock python tools/make_test_sdxl_checkpoint.py

ComfyUI recognises SDXL only at its published size, so every part has SDXL base 1.0's architecture:
the UNet (2.6 B parameters, diffusers layout, converted by ComfyUI's own loader), the CLIP ViT-L and
OpenCLIP bigG text towers and the VAE. All weights are random (seeded), built in float16 so the
build peaks at ~11 GB of memory (5-6 min on 2 CPU cores); the file (7.1 GB) goes to models/checkpoints/g4seg_test_sdxl_full.safetensors,
written by ComfyUI's save_checkpoint (the single-file layout its CheckpointLoaderSimple reads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

NAME = "g4seg_test_sdxl_full.safetensors"

SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                                 "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 1024,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
       "scaling_factor": 0.13025}


def _state(module, prefix=""):
    sd = {prefix + k: v.contiguous() for k, v in module.state_dict().items() if "position_ids" not in k}
    return sd


def build(comfyui: str, out_path: str, seed: int) -> None:
    sys.path.insert(0, comfyui)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.sd
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float16)  # random init straight in half precision: 5 GB, not 10
    try:
        unet_sd = _state(UNet2DConditionModel(**SDXL_UNET))
    finally:
        torch.set_default_dtype(torch.float32)
    unet = comfy.sd.load_diffusion_model_state_dict(unet_sd, model_options={"dtype": torch.float16})
    del unet_sd
    if unet is None or type(unet.model).__name__ != "SDXL":
        raise SystemExit(f"ComfyUI did not recognise the UNet as SDXL: {unet and type(unet.model).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, cls, cfg in (("clip_l", CLIPTextModel, CLIP_L), ("clip_g", CLIPTextModelWithProjection, CLIP_G)):
            model = cls(CLIPTextConfig(**cfg)).half()
            sd = _state(model)
            if not any(k.startswith("text_model.") for k in sd):
                sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
            paths.append(os.path.join(tmp, name + ".safetensors"))
            save_file(sd, paths[-1])
            del model, sd
        clip = comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=_state(AutoencoderKL(**VAE)))
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    comfy.sd.save_checkpoint(out_path, unet, clip, vae, metadata={"g4seg_test": "random weights, SDXL architecture"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    ap.add_argument("--models", default=None, help="ComfyUI models folder (default: COMFYUI/models)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("give --comfyui or set COMFYUI_PATH")
    out = os.path.join(args.models or os.path.join(args.comfyui, "models"), "checkpoints", NAME)
    if args.force or not os.path.exists(out):
        build(args.comfyui, out, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
