"""All model patching of the G4Seg node pack (Explicit Mask Injection in ComfyUI).

ComfyUI calls an attention *replace* patch with the projected tensors
`(q, k, v, extra_options)`, q/k/v `[B, N, heads*dim_head]`, and expects `[B, Nq, heads*dim_head]`
back (`to_out` is applied afterwards). `extra_options` carries, among others, `n_heads`,
`dim_head`, `block` (("input"|"middle"|"output", number)), `block_index`, `original_shape`
(the latent [B, C, H, W]), `activations_shape` (the block's [B, C, h, w], newer builds),
`cond_or_uncond` (one 0 = cond / 1 = uncond entry per batch chunk, in batch order) and
`sigmas`.

Chaining: a replace patch that another pack registered for the same block earlier is kept
as `inner`. Our patch then calls it for the whole batch and adds the EMI *change* on the
conditional rows: `out = inner(q,k,v) + (emi(q,k,v) - plain(q,k,v))` on cond rows,
`out = inner(q,k,v)` elsewhere. Both effects survive (to first order), nothing is
overwritten. Re-injecting G4Seg on an already injected model replaces our own layer and
keeps the other pack's patch underneath.

Nothing here imports ComfyUI at module level, so the CI tests call these functions with
plain tensors and a dict shaped like `extra_options`.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from g4seg_core.errors import G4SegError
from g4seg_core.method.injection import InjectionBatch, grid_for_tokens, plain_attention

SUPPORTED_FAMILIES = "SD1.x, SD2.x (eps and v) and SDXL UNet checkpoints (including LCM/Turbo/Lightning variants of these)"
_SUPPORTED_LATENTS = ("SD15", "SDXL", "SDXL_Playground_2_5")
ATTENTION_NAMES = (("self", "attn1"), ("cross", "attn2"))


# --------------------------------------------------------------------------- grids, rows, time

def token_grid(extra_options: dict, num_tokens: int) -> Tuple[int, int]:
    """The block's (h, w) token grid: activations_shape when present, else from original_shape."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) >= 4:
        h, w = int(shape[-2]), int(shape[-1])
        if h * w == num_tokens:
            return h, w
    original = extra_options.get("original_shape")
    if original is not None and len(original) >= 4:
        return grid_for_tokens(num_tokens, int(original[-2]), int(original[-1]))
    raise G4SegError(
        "ComfyUI did not pass the latent shape to the attention patch (no activations_shape or "
        f"original_shape in extra_options): {SUPPORTED_FAMILIES} are supported")


def cond_rows(extra_options: dict, batch: int, device=None) -> torch.Tensor:
    """Bool [batch]: True for rows that belong to the conditional (positive) chunk.

    ComfyUI concatenates one chunk per entry of `cond_or_uncond` (0 = cond, 1 = uncond) in
    that order; the order is not fixed (uncond often comes first).
    """
    order = extra_options.get("cond_or_uncond")
    if not order:
        return torch.ones(batch, dtype=torch.bool, device=device)
    chunks = len(order)
    if batch % chunks:
        raise G4SegError(f"attention batch {batch} does not split into {chunks} cond/uncond chunks")
    per = batch // chunks
    flags = torch.tensor([int(c) == 0 for c in order], dtype=torch.bool, device=device)
    return flags.repeat_interleave(per)


def image_index(extra_options: dict, batch: int) -> torch.Tensor:
    """Long [batch]: index of the image (latent batch row) each attention row belongs to."""
    order = extra_options.get("cond_or_uncond") or [0]
    per = max(1, batch // len(order))
    return torch.arange(batch) % per


def timestep_from_sigma(sigma: float, log_sigmas: Optional[torch.Tensor]) -> float:
    """Continuous DDPM timestep of a k-diffusion sigma on the model's own discrete schedule."""
    if log_sigmas is None or log_sigmas.numel() < 2:
        raise G4SegError("this model has no discrete noise schedule; use schedule 'constant'")
    ls = log_sigmas.double().cpu()
    x = math.log(max(float(sigma), 1e-12))
    if x <= float(ls[0]):
        return 0.0
    if x >= float(ls[-1]):
        return float(len(ls) - 1)
    hi = int(torch.searchsorted(ls, torch.tensor([x], dtype=torch.float64))[0])
    lo = hi - 1
    frac = (x - float(ls[lo])) / max(float(ls[hi] - ls[lo]), 1e-12)
    return lo + frac


def _sigma_of(extra_options: dict) -> Optional[float]:
    sigmas = extra_options.get("sigmas")
    if sigmas is None:
        return None
    if torch.is_tensor(sigmas):
        return float(sigmas.flatten()[0]) if sigmas.numel() else None
    return float(sigmas[0] if isinstance(sigmas, (list, tuple)) else sigmas)


# --------------------------------------------------------------------------- plain attention

def comfy_attention(q, k, v, heads: int, extra_options: Optional[dict] = None) -> torch.Tensor:
    """Unmodulated attention: ComfyUI's selected backend when importable, else PyTorch SDPA."""
    try:
        from comfy.ldm.modules.attention import optimized_attention  # noqa: WPS433 (lazy on purpose)
    except Exception:  # outside ComfyUI (CI)
        return plain_attention(q, k, v, heads)
    precision = (extra_options or {}).get("attn_precision")
    try:
        return optimized_attention(q, k, v, heads, attn_precision=precision)
    except TypeError:  # older builds without attn_precision
        return optimized_attention(q, k, v, heads)


# --------------------------------------------------------------------------- the patch

class G4SegAttentionPatch:
    """Replace patch for one transformer block's attn1 ("self") or attn2 ("cross").

    `injection`: an InjectionBatch (one mask and class tokens per image, shared by every patch of the
    model so its per-grid inputs are built once per call) or a list of InjectionSettings. Attention row r
    belongs to image (r mod rows per chunk) mod len(injection); conditional rows are modulated. All rows
    go through one batched attention call, whatever masks and class names they have.
    """

    def __init__(self, kind: str, injection, log_sigmas: Optional[torch.Tensor] = None, inner=None, block=None,
                 clock: Optional["SigmaClock"] = None):
        if kind not in ("self", "cross"):
            raise G4SegError(f"attention kind {kind!r}: use 'self' or 'cross'")
        if not isinstance(injection, InjectionBatch):
            if not injection:
                raise G4SegError("G4Seg attention patch needs at least one mask")
            injection = InjectionBatch.from_settings(injection)
        self.kind = kind
        self.injection = injection
        self.log_sigmas = log_sigmas
        self.inner = inner
        self.block = block
        self.clock = clock if clock is not None else SigmaClock(log_sigmas)
        self._rows = {}  # (cond/uncond order, batch) -> (image of each row, cond flags), host tuples

    # ModelPatcher.model_patches_to() calls .to(device) on replace patches.
    def to(self, device):
        if self.inner is not None and hasattr(self.inner, "to"):
            self.inner = self.inner.to(device)
        return self

    def _timestep(self, extra_options: dict) -> float:
        """The DDPM timestep of this call, read once per call (only the 't5' schedule needs it)."""
        if all(s == "constant" for s in self.injection.schedules):
            return 0.0
        return self.clock.timestep(extra_options.get("sigmas"))

    def _base(self, q, k, v, extra_options):
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return comfy_attention(q, k, v, int(extra_options["n_heads"]), extra_options)

    def _row_layout(self, extra_options: dict, batch: int) -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
        """(image of each attention row, conditional flags), worked out on the host from the cond/uncond order
        and cached: it is the same for every layer."""
        order = tuple(int(c) for c in (extra_options.get("cond_or_uncond") or ()))
        key = (order, batch)
        if key not in self._rows:
            images = len(self.injection)
            image = tuple(int(i) % images for i in image_index(extra_options, batch).tolist())
            cond = tuple(bool(c) for c in cond_rows(extra_options, batch).tolist())
            self._rows[key] = (image, cond)
        return self._rows[key]

    def __call__(self, q, k, v, extra_options):
        heads = int(extra_options["n_heads"])
        image, cond = self._row_layout(extra_options, q.shape[0])
        if not self.injection.active or not any(cond):
            return self._base(q, k, v, extra_options)
        grid = token_grid(extra_options, q.shape[1])
        emi = self.injection.attention(q, k, v, heads, kind=self.kind, grid=grid, image_of_row=image, active=cond,
                                       timestep=self._timestep(extra_options))
        if self.inner is None:
            return emi.to(q.dtype)
        # First-order composition with the other pack's attention, on the conditional rows only.
        base = self._base(q, k, v, extra_options)
        change = emi - plain_attention(q, k, v, heads)
        rows = torch.tensor(cond, device=q.device)[:, None, None]
        return torch.where(rows, base + change.to(base.dtype), base)

    def __repr__(self) -> str:
        return f"G4SegAttentionPatch({self.kind}, block={self.block}, masks={len(self.injection)}, inner={type(self.inner).__name__ if self.inner is not None else None})"


class SigmaClock:
    """The sampler's sigma -> the model's timestep, read on the host once per sampling call (not per layer):
    the patches of one model share a clock, and the sigmas tensor is the same object for every layer."""

    def __init__(self, log_sigmas: Optional[torch.Tensor]):
        self.log_sigmas = log_sigmas
        self._last = (None, 0.0)

    def timestep(self, sigmas) -> float:
        if sigmas is None:
            raise G4SegError("schedule 't5' needs the sampler's sigma (extra_options['sigmas'])")
        if self._last[0] is not sigmas:
            sigma = _sigma_of({"sigmas": sigmas})
            if sigma is None:
                raise G4SegError("schedule 't5' needs the sampler's sigma (extra_options['sigmas'])")
            self._last = (sigmas, timestep_from_sigma(sigma, self.log_sigmas))
        return self._last[1]


# --------------------------------------------------------------------------- model inspection

def model_family(model) -> str:
    """'SD1.x' | 'SD2.x' | 'SDXL' for a supported ComfyUI MODEL, else a G4SegError naming the supported ones."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    config_name = type(config).__name__ if config is not None else "unknown"
    latent = getattr(base, "latent_format", None) or getattr(config, "latent_format", None)
    latent_name = latent.__name__ if isinstance(latent, type) else type(latent).__name__
    unet = getattr(base, "diffusion_model", None)
    unet_config = dict(getattr(config, "unet_config", None) or {})
    problems = []
    if type(unet).__name__ != "UNetModel":
        problems.append(f"its denoiser is a {type(unet).__name__}, not a UNet")
    if latent_name not in _SUPPORTED_LATENTS:
        problems.append(f"its latent format is {latent_name}")
    if unet_config.get("use_temporal_attention") or unet_config.get("use_temporal_resblock"):
        problems.append("it is a video model")
    if not hasattr(unet, "input_blocks"):
        problems.append("it has no UNet input blocks")
    if problems:
        raise G4SegError(
            f"G4Seg cannot inject attention into this model ({config_name}: {', '.join(problems)}). "
            f"Supported: {SUPPORTED_FAMILIES}. Flux, SD3, Cascade, DiT and video models are not supported.")
    if latent_name.startswith("SDXL"):
        return "SDXL"
    context = unet_config.get("context_dim")
    return "SD2.x" if context == 1024 else "SD1.x"


def attention_blocks(diffusion_model) -> List[Tuple[str, int, int]]:
    """Every (block_name, number, transformer_index) key ComfyUI uses for a UNet's transformer blocks."""
    keys: List[Tuple[str, int, int]] = []

    def scan(name: str, number: int, container) -> None:
        layers = container if isinstance(container, Iterable) else [container]
        for layer in layers:
            blocks = getattr(layer, "transformer_blocks", None)
            if blocks is not None:
                keys.extend((name, number, i) for i in range(len(blocks)))

    for i, blk in enumerate(getattr(diffusion_model, "input_blocks", []) or []):
        scan("input", i, blk)
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        scan("middle", 0, middle)
    for i, blk in enumerate(getattr(diffusion_model, "output_blocks", []) or []):
        scan("output", i, blk)
    return keys


def model_log_sigmas(model) -> Optional[torch.Tensor]:
    try:
        sampling = model.get_model_object("model_sampling")
    except Exception:
        sampling = getattr(getattr(model, "model", None), "model_sampling", None)
    ls = getattr(sampling, "log_sigmas", None)
    return ls.detach().float().cpu().clone() if torch.is_tensor(ls) else None


def existing_replace(model_options: dict, attn: str, key: Tuple[str, int, int]):
    """The replace patch ComfyUI would call for this block now (3-key first, then 2-key), or None."""
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(attn, {})
    if key in table:
        return table[key]
    return table.get(key[:2])


def inject(model, injection):
    """A clone of the ComfyUI MODEL with EMI replace patches on every attn1/attn2.

    `injection`: an InjectionBatch or a list of InjectionSettings (one per image). Existing replace
    patches of other packs are wrapped (kept as `inner`), ours replaced. Every patch shares one
    InjectionBatch and one SigmaClock, so what a layer needs is built once per call.
    Returns (patched_model, family, number_of_blocks).
    """
    family = model_family(model)
    unet = model.model.diffusion_model
    keys = attention_blocks(unet)
    if not keys:
        raise G4SegError(f"found no transformer blocks in this UNet; supported: {SUPPORTED_FAMILIES}")
    if not isinstance(injection, InjectionBatch):
        if not injection:
            raise G4SegError("G4Seg attention patch needs at least one mask")
        injection = InjectionBatch.from_settings(injection)
    log_sigmas = model_log_sigmas(model)
    clock = SigmaClock(log_sigmas)
    patched = model.clone()
    for kind, attn in ATTENTION_NAMES:
        for key in keys:
            inner = existing_replace(patched.model_options, attn, key)
            if isinstance(inner, G4SegAttentionPatch):
                inner = inner.inner
            patch = G4SegAttentionPatch(kind, injection, log_sigmas=log_sigmas, inner=inner, block=key, clock=clock)
            patched.set_model_patch_replace(patch, attn, key[0], key[1], key[2])
    return patched, family, len(keys)


def label_positions_from_tokens(prompt_tokens: Dict[str, list], label_tokens: Dict[str, list],
                                empty_tokens: Dict[str, list], label: str, prompt: str,
                                occurrences: int = 1) -> List[int]:
    """Class-token positions from ComfyUI `clip.tokenize` outputs (SD1 'l', SD2 'h', SDXL 'g'+'l').

    Each value is a list of 77-token chunks of (id, weight[, word_id]) tuples. The label's ids
    are its tokenization minus the start/end/pad tokens seen in the empty prompt. Positions
    index the concatenated chunks (= the cross-attention keys). All encoders must agree.
    """
    from g4seg_core.method.tokens import find_token_positions

    def ids(chunks):
        return [int(t[0]) if isinstance(t[0], (int,)) or (torch.is_tensor(t[0]) and t[0].numel() == 1) else -1
                for chunk in chunks for t in chunk]

    found: Dict[str, List[int]] = {}
    for name, chunks in prompt_tokens.items():
        if name not in label_tokens:
            continue
        empty = ids(empty_tokens.get(name, [[]])[:1])
        special = set(empty[:2]) | ({empty[-1]} if empty else set())
        lab = [i for i in ids(label_tokens[name][:1]) if i not in special]
        found[name] = find_token_positions(ids(chunks), lab, label=label, prompt=prompt, occurrences=occurrences)
    if not found:
        raise G4SegError("the CLIP tokenizer returned no tokens; connect an SD1.x/SD2.x/SDXL CLIP")
    values = list(found.values())
    if any(v != values[0] for v in values[1:]):
        raise G4SegError(f"the text encoders place {label!r} at different positions {found}; "
                         "use a plain prompt template such as 'a photo of a {}'")
    return values[0]


__all__ = [
    "G4SegAttentionPatch", "SUPPORTED_FAMILIES", "SigmaClock", "attention_blocks", "comfy_attention", "cond_rows",
    "existing_replace", "image_index", "inject", "label_positions_from_tokens", "model_family",
    "timestep_from_sigma", "token_grid",
]
