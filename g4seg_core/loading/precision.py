"""The dtype the models compute in: what `auto` picks, and which explicit choices cannot work.

auto: bfloat16 on CPUs where it measured faster than float32 (AMX-BF16, or an AMD CPU with
AVX512-BF16: SD's convolutions and matmuls about twice as fast; an Intel CPU with AVX512-BF16
but no AMX ran bfloat16 slower, bf16_verdict), float16 on CUDA GPUs
(bfloat16 for SDXL on GPUs with native bf16: its VAE overflows in float16 and would
otherwise fall back to float32), float32 anywhere else.

Whatever the models compute in, the parts that need precision stay float32: latents
between stages, the noise-schedule arithmetic and the x0 prediction (schedule.py), CLIP
features and the correspondence, and the mixing. Attention softmax accumulates in float32
inside PyTorch's fused kernels for bf16/fp16 inputs.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

from ..config import DTYPE_CHOICES
from ..errors import G4SegError

log = logging.getLogger("g4seg")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return NAMES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _cpuinfo(path: str = "/proc/cpuinfo") -> Tuple[Optional[str], Optional[set]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; (None, None) where there is none."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None, None
    vendor, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return vendor, flags


def bf16_verdict(vendor: Optional[str], flags: set) -> Tuple[bool, str]:
    """(fast, why) for a CPU's vendor and feature flags: is oneDNN's bfloat16 faster than float32 there?

    Measured with SD2.1 at 512x512 on 2 cores (docs/BENCHMARKS.md): an AMD EPYC with avx512_bf16 runs bfloat16 in
    0.48-0.53 of the float32 time; an Intel Xeon with avx512_bf16 but no AMX (an Emerald Rapids VM whose hypervisor
    hides AMX) in 1.13 of it (its bf16 dot products have half the FMA throughput); Xeons with AMX-BF16 were
    measured faster in bfloat16 (VAE decode 14.5 -> 6.9 s)."""
    if "amx_bf16" in flags:
        return True, "CPU has amx_bf16"
    if "avx512_bf16" not in flags:
        return False, "CPU lacks amx_bf16 and avx512_bf16 (bfloat16 would be emulated, slower than float32)"
    if vendor == "AuthenticAMD":
        return True, "AMD CPU with avx512_bf16"
    return False, (f"CPU has avx512_bf16 but no amx_bf16 ({vendor or 'vendor unknown'}): bfloat16 measured slower "
                   "than float32 on such a CPU")


@functools.lru_cache(maxsize=None)
def cpu_bf16_support() -> Tuple[bool, str]:
    """(fast, why): does this CPU run bfloat16 natively, so that oneDNN's bf16 kernels beat float32?"""
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (its bf16 CPU kernels)"
    vendor, flags = _cpuinfo()
    if flags is not None:
        return bf16_verdict(vendor, flags)
    # no /proc/cpuinfo (macOS, Windows): PyTorch's own CPU feature probes, the vendor from the platform
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    flags = {name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()}
    vendor = "AuthenticAMD" if "AUTHENTICAMD" in platform.processor().upper() else None  # not "AMD64": any x86-64
    return bf16_verdict(vendor, flags)


def _cuda_native_bf16(device: torch.device) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def available_devices() -> List[str]:
    """The devices this machine and this PyTorch build can compute on, as --device takes them."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def device_problem(device: Union[str, torch.device]) -> Optional[str]:
    """Why `device` cannot be computed on here (naming the devices there are), or None."""
    here = f"devices here: {', '.join(available_devices())}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return f"not a device name; {here} (e.g. cpu, cuda, cuda:1)"
    kind, index = parsed.type, parsed.index
    if kind == "cpu":
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            return f"{why}; {here}"
        if index is not None and index >= torch.cuda.device_count():
            return f"there is no GPU {index}; {here}"
        return None
    if kind in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if kind == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            return f"no {kind} device here; {here}"
        return None
    return f"G4Seg computes on cpu, cuda, mps or xpu, not {kind}; {here}"


def check_device(device: Union[str, torch.device]) -> str:
    """`device` as a string when it exists here, else a G4SegError naming the devices there are."""
    problem = device_problem(device)
    if problem:
        raise G4SegError(f"device={str(device)!r}: {problem}")
    return str(device)


def default_device(device: Optional[Union[str, torch.device]] = None) -> str:
    """The device asked for (checked to exist), else the GPU when there is one, else the CPU."""
    if device:
        return check_device(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(requested: Union[str, torch.dtype, DtypeChoice, None], device: Union[str, torch.device],
                  family: Optional[str] = None) -> DtypeChoice:
    """The dtype to compute in on `device` for `requested` ("auto", a name or a torch dtype).

    An explicit choice wins unless it cannot work there (a G4SegError names the fix);
    `family` (sd15/sd21/sd21v/sdxl) refines auto on GPUs.
    """
    if isinstance(requested, DtypeChoice):  # already resolved (G4SegPipeline.from_pretrained)
        return requested
    device = torch.device(device)
    if isinstance(requested, torch.dtype):
        if requested not in NAMES:
            raise G4SegError(f"dtype {requested}: choose one of {', '.join(DTYPE_CHOICES)}")
        requested = NAMES[requested]
    requested = "auto" if requested is None else str(requested)
    if requested not in DTYPE_CHOICES:
        raise G4SegError(f"dtype={requested!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    if requested == "auto":
        return _auto(device, family)
    dtype = DTYPES[requested]
    if device.type == "cpu" and dtype == torch.float16:
        raise G4SegError("dtype float16 on CPU: PyTorch's CPU float16 kernels are many times slower than float32; "
                         "use --dtype bfloat16 (fast on CPUs with AMX, or AMD CPUs with AVX512-BF16), --dtype float32, "
                         "--dtype auto, or --device cuda")
    if device.type == "cpu" and dtype == torch.bfloat16:
        fast, why = cpu_bf16_support()
        if not fast:
            log.warning("g4seg: bfloat16 as asked, but %s: --dtype float32 is faster here", why)
            return DtypeChoice(dtype, f"asked for ({why}: slower than float32)")
    # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (pre-Ampere)
    if device.type == "cuda" and dtype == torch.bfloat16 and not _cuda_native_bf16(device):
        raise G4SegError(f"dtype bfloat16 on {torch.cuda.get_device_name(device)}: this GPU has no bfloat16; "
                         "use --dtype float16 (or auto)")
    return DtypeChoice(dtype, "asked for")


def dtype_key(requested: Union[str, torch.dtype, None], device: Union[str, torch.device],
              family: Optional[str] = None) -> str:
    """The dtype a run will compute in, as far as it is known before the models load (for --skip-existing):
    the resolved name, so `auto` and the dtype it picks are one parameter; "auto" only where auto still
    depends on the model family (a CUDA GPU with native bfloat16 and no family given). Raises what
    resolve_dtype raises (float16 on a CPU ...), before any work."""
    if family is None and str(requested or "auto") == "auto":
        dev = torch.device(device)
        if _auto(dev, None).dtype != _auto(dev, "sdxl").dtype:
            return "auto"
    return dtype_name(resolve_dtype(requested, device, family).dtype)


def _auto(device: torch.device, family: Optional[str]) -> DtypeChoice:
    if device.type == "cuda":
        if family == "sdxl" and _cuda_native_bf16(device):
            return DtypeChoice(torch.bfloat16, "auto: SDXL on a GPU with native bfloat16 (its VAE overflows in float16)")
        return DtypeChoice(torch.float16, "auto: CUDA GPU")
    if device.type == "cpu":
        fast, why = cpu_bf16_support()
        if fast:
            return DtypeChoice(torch.bfloat16, f"auto: {why}")
        return DtypeChoice(torch.float32, f"auto: {why}")
    return DtypeChoice(torch.float32, f"auto: {device.type} device")


def compute_dtype_for_storage(weight_dtype: torch.dtype, device: Union[str, torch.device]) -> torch.dtype:
    """The dtype to compute in for a model a host stores in `weight_dtype` and casts per layer to its
    input's dtype (ComfyUI's manual-cast layers): the storage dtype where it is fast on `device`
    (fp16/bf16 on GPUs, bf16 on CPUs with native bf16), float32 otherwise (fp16 on a CPU is slow)."""
    device = torch.device(device)
    if weight_dtype in (torch.float16, torch.bfloat16) and device.type == "cuda":
        return weight_dtype
    if weight_dtype == torch.bfloat16 and device.type == "cpu" and cpu_bf16_support()[0]:
        return torch.bfloat16
    return torch.float32


def vae_channels_last(device: Union[str, torch.device]) -> bool:
    """Run the VAE in channels_last? On CPUs, yes: oneDNN's convolutions skip a layout reorder per layer.
    Measured on a 2-core AVX512-BF16 CPU, SD2.1 VAE decode at 512x512: process CPU time 19.1 -> 15.5 s in
    bfloat16 and 35.6 -> 30.8 s in float32 (docs/BENCHMARKS.md). The UNet stays contiguous: channels_last
    measured no faster in bfloat16 and ~8 % slower in float32 there (SD2.1, 512x512, alternating runs).
    Not measured on GPUs: off there."""
    return torch.device(device).type == "cpu"
