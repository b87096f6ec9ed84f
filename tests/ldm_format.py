"""Test helper: diffusers/transformers models -> original LDM single-file key layout.

The inverse of diffusers' single-file conversion, written from the LDM layout itself
(openaimodel.py's input/middle/output blocks, the KL autoencoder's down/mid/up stacks,
OpenCLIP's resblocks with fused in_proj), so a tiny checkpoint can be written as a
ComfyUI-style .safetensors and read back through `load_sd_components`. It covers every
configuration the tiny models use (any number of levels, layers_per_block, attention or
not per level, SD1 conv / SD2 linear projections, SDXL's text_time embedding).
"""

from __future__ import annotations

import re
from typing import Dict, Optional

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET[head]}.{tail}"


def unet_to_ldm(unet) -> Dict[str, torch.Tensor]:
    cfg = unet.config
    per_level = cfg.layers_per_block + 1  # LDM: L resnets(+attn) then one down/upsample entry per level
    up_has_attn = ["CrossAttn" in t for t in cfg.up_block_types]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = {}
    for key, value in unet.state_dict().items():
        stem, _, param = key.rpartition(".")
        if stem in fixed:
            new = f"{fixed[stem]}.{param}"
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, l, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per_level + l}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per_level + cfg.layers_per_block}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{0 if m[1] == '0' else 2}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            b = int(m[1])
            slot = 2 if up_has_attn[b] else 1  # after the resnet (and the transformer if any)
            new = f"output_blocks.{b * per_level + cfg.layers_per_block}.{slot}.conv.{m[2]}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[UNET + new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(vae) -> Dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        new = key
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", key):
            new = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", key):
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
            if value.ndim == 2:  # LDM's attention uses 1x1 convs
                value = value[:, :, None, None]
        out[VAE + new] = value
    return out


def clip_to_ldm(encoder, prefix: str) -> Dict[str, torch.Tensor]:
    """transformers CLIP text weights under an LDM prefix, transformers naming kept (SD1, SDXL's first)."""
    out = {}
    for key, value in encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    # real SD1.x files also store the position ids buffer
    n = encoder.config.max_position_embeddings
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(n)[None]
    # (the buffer is not in the state dict of current transformers; old ones had it persistent)
    return out


def openclip_to_ldm(encoder, prefix: str, extra_layers: int = 0, projection: Optional[torch.Tensor] = None,
                    seed: int = 0) -> Dict[str, torch.Tensor]:
    """transformers CLIP text weights -> OpenCLIP naming (resblocks, fused in_proj, text_projection).

    extra_layers appends random resblocks that the encoder does not use (SD2's 24th layer);
    projection is written as text_projection when the encoder has none (SD2 files carry one).
    """
    sd = {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in encoder.state_dict().items()}
    out = {}
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    layers = encoder.config.num_hidden_layers
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP: x @ text_projection
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key):
            i, module, param = m[1], m[2], m[3]
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module == "self_attn.q_proj":
                    parts = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{param}"] for p in "qkv"]
                    out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(parts, 0)
                continue
            out[f"{prefix}transformer.resblocks.{i}.{rename[module]}.{param}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text key {key}")
    generator = torch.Generator().manual_seed(seed)
    template = {k: v for k, v in out.items() if ".resblocks.0." in k}
    for extra in range(extra_layers):
        for key, value in template.items():
            new = key.replace(".resblocks.0.", f".resblocks.{layers + extra}.")
            out[new] = (torch.empty_like(value) if value.is_meta
                        else torch.randn(value.shape, generator=generator).to(value.dtype))
    if projection is not None:
        out[prefix + "text_projection"] = projection
    out[prefix + "logit_scale"] = torch.tensor(4.6052)  # stored by OpenCLIP, unused by SD
    return out


def components_to_ldm(components, v_pred_marker: bool = False, schedule: bool = True) -> Dict[str, torch.Tensor]:
    """A whole SDComponents as one LDM state dict (like a ComfyUI models/checkpoints file)."""
    out = {}
    out.update(unet_to_ldm(components.unet))
    out.update(vae_to_ldm(components.vae))
    family = components.family
    encoders = components.text_encoders
    if family == "sd15":
        out.update(clip_to_ldm(encoders[0], "cond_stage_model.transformer."))
    elif family in ("sd21", "sd21v"):
        width = encoders[0].config.hidden_size
        meta = next(encoders[0].parameters()).is_meta  # full-size shape checks run on the meta device
        projection = (torch.empty(width, width, device="meta") if meta
                      else torch.randn(width, width, generator=torch.Generator().manual_seed(1)))
        out.update(openclip_to_ldm(encoders[0], "cond_stage_model.model.", extra_layers=1, projection=projection))
    else:
        out.update(clip_to_ldm(encoders[0], "conditioner.embedders.0.transformer."))
        out.update(openclip_to_ldm(encoders[1], "conditioner.embedders.1.model."))
    if schedule:
        out["alphas_cumprod"] = components.alphas_cumprod.float()
    if v_pred_marker:
        out["v_pred"] = torch.tensor([])
    return {k: v.detach().contiguous() if v.is_meta else v.detach().contiguous().clone() for k, v in out.items()}


def write_checkpoint(components, path, **kwargs) -> None:
    from safetensors.torch import save_file

    save_file(components_to_ldm(components, **kwargs), str(path))
