"""Operators one UNet call dispatches, bare and with the masks injected, on the accelerator code path.

    python bench/unet_operators.py                      # SD2.1 architecture, 512x512, batch 1 and 8
    python bench/unet_operators.py --family sdxl --size 1024 --batch 1

A UNet at batch 1 on a fast GPU is launch-bound (GPU.md: 28 ms eager, 9.3 ms under a CUDA graph), so what the
injection adds there is mostly the operators it dispatches per attention layer, not their FLOPs. This counts them
without a GPU: the models are built on PyTorch's meta device (shapes only, no weights, no compute), which also takes
the code paths an accelerator takes (no CPU-only row selection; the head dimension padded to a multiple of 8).
Counts are of aten operators after decomposition, views included; on the meta device scaled_dot_product_attention
decomposes into its math form, the same in both calls, so the difference is the injection's own. Prints one line
per (batch, mode): bare, injected, extra per attention layer, and the most frequent extra operators.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g4seg_core.commands.bench import OperatorCount  # noqa: E402
from g4seg_core.config import EMI_MODES, G4SegConfig  # noqa: E402
from g4seg_core.method.injection import InjectionBatch  # noqa: E402
from g4seg_core.models.components import build_unet  # noqa: E402
from g4seg_core.models.diffusers_patch import InjectionState, injected  # noqa: E402
from g4seg_core.models.families import family_configs  # noqa: E402
from g4seg_core.models.tiny import tiny_configs  # noqa: E402


def count_call(unet, batch: int, size: int, mode: str, dtype: torch.dtype = torch.float16) -> dict:
    """Operators of one bare UNet call and one with `batch` distinct masks and class tokens injected (mode)."""
    config = unet.config
    latent = size // 8
    latents = torch.zeros(batch, config.in_channels, latent, latent, device="meta", dtype=dtype)
    hidden = torch.zeros(batch, 77, config.cross_attention_dim, device="meta", dtype=dtype)
    timestep = torch.full((batch,), 400.0, device="meta")
    kwargs = {}
    if getattr(config, "addition_embed_type", None) == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled, device="meta", dtype=dtype),
                                       "time_ids": torch.zeros(batch, 6, device="meta", dtype=dtype)}
    with torch.no_grad():
        with OperatorCount() as bare:
            unet(latents, timestep, encoder_hidden_states=hidden, **kwargs)
        masks = torch.zeros(batch, size, size, device="meta")
        injection = InjectionBatch.from_config(masks, [[5 + i % 3] for i in range(batch)], G4SegConfig(emi_mode=mode))
        with injected(unet, InjectionState(injection, (latent, latent), 400.0)):
            with OperatorCount() as with_mask:
                unet(latents, timestep, encoder_hidden_states=hidden, **kwargs)
    layers = len(unet.attn_processors)
    return {"batch": batch, "mode": mode, "bare": bare.count, "injected": with_mask.count, "attention_layers": layers,
            "extra_per_layer": (with_mask.count - bare.count) / layers,
            "top_extra": (with_mask.names - bare.names).most_common(8)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd21", help="sd15, sd21, sd21v, sdxl, or 'tiny' (the tests' tiny UNet)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=["densediffusion", "additive"],
                        choices=[m for m in EMI_MODES if m != "off"])
    args = parser.parse_args(argv)
    configs = tiny_configs("sd21") if args.family == "tiny" else family_configs(args.family)
    with torch.device("meta"):
        unet = torch.nn.Module.to(build_unet(configs["unet"]), torch.float16)  # diffusers' own .to warns
    print(f"{args.family} UNet, {args.size}x{args.size}, meta device (accelerator code path), float16")
    for batch in args.batch:
        for mode in args.modes:
            row = count_call(unet, batch, args.size, mode)
            top = ", ".join(f"{name} {n}" for name, n in row["top_extra"])
            print(f"  batch {batch}, {mode}: bare {row['bare']}, injected {row['injected']} "
                  f"(+{row['extra_per_layer']:.1f} per attention layer, {row['attention_layers']} layers); "
                  f"most added: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
