"""Write random-weight SD2.1-architecture models into a ComfyUI models folder (tests, timing).

Run with a Python that has torch, diffusers and transformers; when ComfyUI is importable
(`--comfyui PATH` or COMFYUI_PATH) the diffusers folder is also converted into a single-file
checkpoint with ComfyUI's own loader/saver, so `CheckpointLoaderSimple` finds it:

    COMFYUI_PATH=/work/ComfyUI python tools/make_test_comfy_models.py --size tiny
    COMFYUI_PATH=/work/ComfyUI python tools/make_test_comfy_models.py --size full

Writes (names carry the size):
    models/diffusers/g4seg_test_sd21_<size>/{unet,vae,text_encoder}/...   (DiffusersLoader)
    models/checkpoints/g4seg_test_sd21_<size>.safetensors                  (CheckpointLoaderSimple)
    models/clip_vision/g4seg_test_vitl14.safetensors                       (CLIPVisionLoader)
    models/clip_vision/g4seg_test_vith14.safetensors   (--vith: ViT-H/14, 1024-d like SD2.1's text tower,
                                                        for the words -> mask workflows; float16, 1.3 GB)
    models/controlnet/g4seg_test_controlnet_sd21_<size>.safetensors        (ControlNetLoader)

Layouts are what ComfyUI's detection expects: the UNet keeps SD2.1's model_channels=320,
context_dim=1024 and linear projections ("tiny" only drops levels and layers); the text
encoder is the full 24-layer 1024-wide OpenCLIP-H text tower and the CLIP vision model the
full ViT-L/14, saved with the `text_model.` / `vision_model.` prefixes that current
transformers leaves off its submodule state dicts. All weights are random (seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def unet_config(size: str) -> dict:
    cfg = {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_num_groups": 32,
        "norm_eps": 1e-5, "cross_attention_dim": 1024, "use_linear_projection": True,
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "attention_head_dim": [5, 10, 20, 20],
    }
    if size == "tiny":
        cfg.update({
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640],
            "attention_head_dim": [5, 10],
        })
    return cfg


VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}

TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23 + 1,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                   projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)

VISION_CONFIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


VISION_H_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def _prefixed(sd: dict, prefix: str, keep=("visual_projection.", "text_projection.")) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix) or k.startswith(keep):
            out[k] = v.contiguous()
        else:
            out[prefix + k] = v.contiguous()
    return out


def write_diffusers(folder: str, size: str, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    for sub in ("unet", "vae", "text_encoder"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    unet = UNet2DConditionModel(**unet_config(size))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "unet", "config.json"), "w") as f:
        json.dump(unet_config(size), f, indent=1)
    del unet
    vae = AutoencoderKL(**VAE_CONFIG)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "vae", "config.json"), "w") as f:
        json.dump(VAE_CONFIG, f, indent=1)
    del vae
    # with its text_projection, as SD2.x files keep it (words -> mask needs it; ComfyUI would leave it uninitialised)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_CONFIG))
    sd = text.state_dict()
    if not any(k.startswith("text_model.") for k in sd):
        sd = {("text_model." + k): v for k, v in sd.items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "text_encoder", "model.safetensors"))
    with open(os.path.join(folder, "text_encoder", "config.json"), "w") as f:
        json.dump(dict(TEXT_CONFIG, architectures=["CLIPTextModelWithProjection"], model_type="clip_text_model"), f,
                  indent=1)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "g4seg_test": size}, f)


def write_clip_vision(path: str, seed: int, config: dict = VISION_CONFIG, half: bool = False) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed + 1)
    if half:  # initialised in float16 straight away: 1.3 GB for ViT-H, not 2.5 GB + a copy
        torch.set_default_dtype(torch.float16)
    try:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    finally:
        torch.set_default_dtype(torch.float32)
    sd = model.state_dict()
    sd = _prefixed(sd, "vision_model.")
    sd = {k: v for k, v in sd.items() if "position_ids" not in k}
    save_file(sd, path)


def has_text_projection(path: str) -> bool:
    """Was this text encoder / checkpoint written with a text_projection (older test models were not)?"""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(k.endswith(("text_projection", "text_projection.weight")) for k in f.keys())


def ldm_unet_config(size: str) -> dict:
    """The LDM (ComfyUI) description of unet_config(size), for ComfyUI's diffusers->LDM key map."""
    if size == "tiny":
        return {"num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 0],
                "transformer_depth_output": [1, 1, 0, 0], "transformer_depth_middle": 1}
    return {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}


def write_checkpoint(folder: str, out_path: str, comfyui: str, size: str) -> None:
    """Single-file checkpoint written by ComfyUI's own save_checkpoint (LDM key layout).

    ComfyUI only recognises diffusers UNets of published sizes, so the UNet is renamed to
    LDM keys with ComfyUI's `unet_to_diffusers` map first; CLIP and VAE load from the folder.
    """
    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    import comfy.cli_args

    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.sd
    import comfy.utils

    dsd = comfy.utils.load_torch_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    mapping = comfy.utils.unet_to_diffusers(ldm_unet_config(size))
    unmapped = sorted(k for k in dsd if k not in mapping)
    if unmapped:
        raise SystemExit(f"diffusers keys without an LDM name: {unmapped[:10]}")
    ldm = {mapping[k]: v for k, v in dsd.items()}
    unet = comfy.sd.load_diffusion_model_state_dict(ldm)
    if unet is None:
        raise SystemExit("ComfyUI did not recognise the converted UNet")
    clip = comfy.sd.load_clip([os.path.join(folder, "text_encoder", "model.safetensors")])
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors")))
    comfy.sd.save_checkpoint(out_path, unet, clip, vae, metadata={"g4seg_test": "random weights"})
    return unet


def write_controlnet(unet, out_path: str, seed: int) -> None:
    """A random-weight ControlNet (3-channel hint) for this UNet, in ComfyUI's own layout.

    Built with ComfyUI's ControlNet class from the UNet config ComfyUI detected, so
    ControlNetLoader recognises it the way it recognises a published SD ControlNet.
    """
    import comfy.cldm.cldm
    import comfy.ops
    import safetensors.torch
    import torch

    config = dict(unet.model.model_config.unet_config)
    config.pop("out_channels", None)
    torch.manual_seed(seed)
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.manual_cast, device="cpu",
                                         **{k: v for k, v in config.items() if k not in ("device", "operations")})
    with torch.no_grad():
        for param in control.parameters():  # ComfyUI's layers skip initialisation
            param.normal_(0.0, 0.02)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in control.state_dict().items()}, out_path,
                                metadata={"g4seg_test": "random weights"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--models", default=None, help="ComfyUI models folder (default: $COMFYUI_PATH/models)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout for the checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--vith", action="store_true", help="also a ViT-H/14 CLIP vision model (words -> mask workflows)")
    args = ap.parse_args(argv)
    models = args.models or (os.path.join(args.comfyui, "models") if args.comfyui else None)
    if not models:
        ap.error("give --models or set COMFYUI_PATH")
    name = f"g4seg_test_sd21_{args.size}"
    folder = os.path.join(models, "diffusers", name)
    text_file = os.path.join(folder, "text_encoder", "model.safetensors")
    stale = os.path.exists(text_file) and not has_text_projection(text_file)  # written before the projection
    if args.force or stale or not os.path.exists(text_file):
        write_diffusers(folder, args.size, args.seed)
        print("wrote", folder)
    cv_dir = os.path.join(models, "clip_vision")
    os.makedirs(cv_dir, exist_ok=True)
    cv = os.path.join(cv_dir, "g4seg_test_vitl14.safetensors")
    if args.force or not os.path.exists(cv):
        write_clip_vision(cv, args.seed)
        print("wrote", cv)
    cv_h = os.path.join(cv_dir, "g4seg_test_vith14.safetensors")
    if args.vith and (args.force or not os.path.exists(cv_h)):
        write_clip_vision(cv_h, args.seed, VISION_H_CONFIG, half=True)
        print("wrote", cv_h)
    if args.comfyui:
        ckpt_dir = os.path.join(models, "checkpoints")
        os.makedirs(ckpt_dir, exist_ok=True)
        ckpt = os.path.join(ckpt_dir, name + ".safetensors")
        controlnet = os.path.join(models, "controlnet", f"g4seg_test_controlnet_sd21_{args.size}.safetensors")
        if args.force or stale or not os.path.exists(ckpt) or not os.path.exists(controlnet):
            unet = write_checkpoint(folder, ckpt, args.comfyui, args.size)
            print("wrote", ckpt)
            write_controlnet(unet, controlnet, args.seed)
            print("wrote", controlnet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
