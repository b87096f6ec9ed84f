"""Weight files -> state dicts, and strict assignment of state dicts into models.

Only tensors are ever read (.safetensors, or pickles with torch.load(weights_only=True)).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Union

import torch

from ..errors import G4SegError


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickled checkpoint read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise G4SegError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise G4SegError(f"{path.name}: unknown weights format {suffix!r}; use .safetensors, .ckpt, .pt, .pth or .bin")
    except G4SegError:
        raise
    except Exception as exc:  # corrupt file, or a pickle holding more than tensors
        raise G4SegError(f"could not read {path}: {type(exc).__name__}: {str(exc)[:300]}. If it is an old .ckpt "
                         "holding training objects, convert it to .safetensors (weights only are ever loaded)") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        extra = {k: v for k, v in data.items() if k != "state_dict" and isinstance(v, torch.Tensor)}
        data = {**data["state_dict"], **extra}
    if not isinstance(data, Mapping):
        raise G4SegError(f"{path.name} does not hold a state dict (got {type(data).__name__})")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def with_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if k.startswith(prefix)}


def _format_keys(keys: Sequence[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def unconverted_keys(source: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor]) -> List[str]:
    """Source keys whose tensors no converted entry came from (diffusers' converters drop unknown keys).

    The UNet and VAE converters pass tensors through (or as views), so storage identity tells
    which source tensors were used.
    """
    def ident(t):
        return (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else None

    used = {ident(t) for t in converted.values()}
    harmless = (".loss.", "model_ema")  # training-only tensors some old .ckpt files still carry
    return sorted(k for k, t in source.items() if ident(t) is not None and ident(t) not in used
                  and ident(t)[0] != 0 and not any(h in k for h in harmless))


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers stay on the meta device after an assign-load: rebuild them."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.device.type != "meta":
                continue
            if name == "position_ids":  # transformers CLIP: arange(num_positions)[None]
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            else:
                raise G4SegError(f"internal: buffer {name} of {type(module).__name__} was not loaded")


def assign_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], what: str, source: str,
                    hint: str = "", assign: bool = True, unconverted: Sequence[str] = ()) -> None:
    """Strict load: every parameter present, nothing extra, every shape right, else G4SegError.

    1x1 conv weights and linear weights are interchangeable (SD1 uses convs for the
    transformer's proj_in/out, SD2 linears; some files store the other form).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) + list(unconverted)
    wrong = []
    for key in sorted(set(expected) & set(state_dict)):
        want, got = tuple(expected[key].shape), state_dict[key]
        if tuple(got.shape) == want:
            continue
        if got.numel() == math.prod(want) and [d for d in got.shape if d != 1] == [d for d in want if d != 1]:
            state_dict[key] = got.reshape(want)
        else:
            wrong.append(f"{key} file {tuple(got.shape)} vs model {want}")
    if missing or unexpected or wrong:
        parts = [f"{source}: the {what} weights do not match the expected architecture"]
        if missing:
            parts.append(f"{len(missing)} missing: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_format_keys(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape: {_format_keys(wrong, 6)}")
        parts.append(hint or "is the file complete and a plain SD1.x / SD2.x / SDXL checkpoint?")
        raise G4SegError("; ".join(parts))
    if assign:
        # contiguous copies: converted tensors can be strided views (sliced 1x1 convs, q/k/v splits)
        for key, value in state_dict.items():
            if not value.is_contiguous():
                state_dict[key] = value.contiguous()
        model.load_state_dict(state_dict, strict=True, assign=True)
        _materialize_buffers(model)
    else:
        model.load_state_dict(state_dict, strict=True)
