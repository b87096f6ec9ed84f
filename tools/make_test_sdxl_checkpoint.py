"""Write a random-weight, full-size SDXL checkpoint that ComfyUI loads as SDXL (for the opt-in SDXL test).

    COMFYUI_PATH=/path/to/ComfyUI python tools/make_test_sdxl_checkpoint.py

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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _state(module):
    return {k: v.contiguous() for k, v in module.state_dict().items() if "position_ids" not in k}


def build(comfyui: str, out_path: str, seed: int) -> None:
    sys.path.insert(0, comfyui)
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    sys.path.insert(0, ROOT)
    from g4seg_core.models.components import build_unet, build_vae
    from g4seg_core.models.families import family_configs
    from g4seg_core.models.text_encoders import build_text_encoder

    configs = family_configs("sdxl")  # the architecture g4seg ships for SDXL base 1.0
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.float16)  # random init straight in half precision: 5 GB, not 10
    try:
        unet_sd = _state(build_unet(configs["unet"]))
    finally:
        torch.set_default_dtype(torch.float32)
    unet = comfy.sd.load_diffusion_model_state_dict(unet_sd, model_options={"dtype": torch.float16})
    del unet_sd
    if unet is None or type(unet.model).__name__ != "SDXL":
        raise SystemExit(f"ComfyUI did not recognise the UNet as SDXL: {unet and type(unet.model).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, cfg in zip(("clip_l", "clip_g"), configs["text_encoders"]):
            model = build_text_encoder(cfg).half()
            sd = _state(model)
            if not any(k.startswith("text_model.") for k in sd):
                sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
            paths.append(os.path.join(tmp, name + ".safetensors"))
            save_file(sd, paths[-1])
            del model, sd
        clip = comfy.sd.load_clip(paths, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=_state(build_vae(configs["vae"])))
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
