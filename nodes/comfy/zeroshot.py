"""ComfyUI's own objects as the two towers of words -> coarse mask (ComfyUI-specific engine code).

* `ComfyTextTower`: the CLIP object (the checkpoint's text encoder) -> projected end-of-text
  embeddings, one prompt per `clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)`
  call, parentheses escaped (ComfyUI reads "(word:1.2)" as prompt weighting). An SD2.x CLIP is
  OpenCLIP ViT-H/14's text tower with its projection; SDXL's pooled output is clip_g's (bigG).
(The image tower, CLIP_VISION with NACLIP's last block, is clip_vision.comfy_clip_vision_features.)
No ComfyUI import at module level.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from g4seg_core.errors import G4SegError
from g4seg_core.zeroshot.text import NO_PROJECTION, QueryEmbeddings

from ..common import Progress, check_interrupt, escape_prompt

COMFY_SD1 = ("this CLIP is SD1.x's text encoder (CLIP ViT-L/14 without its text_projection): its embeddings cannot be "
             "compared with image embeddings. Load an SD2.x checkpoint (its CLIP pairs with clip_vision_h.safetensors) "
             "or SDXL (clip_g pairs with clip_vision_g.safetensors), or load a CLIP text encoder file with "
             "its projection (CLIPLoader)")


def openclip_text_tower(clip) -> Tuple[str, torch.nn.Module]:
    """(name, SDClipModel) of the projected OpenCLIP text tower inside a ComfyUI CLIP (clip_g before clip_h)."""
    model = getattr(clip, "cond_stage_model", None)
    if model is None or not hasattr(clip, "tokenize") or not hasattr(clip, "encode_from_tokens"):
        raise G4SegError(f"expected a ComfyUI CLIP (text encoder) object, got {type(clip).__name__}")
    for name in ("clip_g", "clip_h"):
        tower = getattr(model, name, None)
        if tower is not None:
            return name, tower
    if getattr(model, "clip_l", None) is not None:
        raise G4SegError(COMFY_SD1)
    raise G4SegError(f"this CLIP ({type(model).__name__}) holds no OpenCLIP ViT-H/bigG text tower; text -> mask "
                     "needs the CLIP of an SD2.x or SDXL checkpoint (paired with clip_vision_h / clip_vision_g)")


def check_projection(weight: torch.Tensor, source: str) -> None:
    """A text_projection that was never loaded (ComfyUI leaves it uninitialised) is an error, not a result.

    Uninitialised memory is usually all zeros, sometimes garbage; a trained projection is finite with a
    spread of a few hundredths. The check catches zeros, non-finite values and absurd magnitudes; an
    uninitialised tensor that happens to hold plausible numbers cannot be told apart.
    """
    w = weight.detach().float()
    spread = float(w.std()) if w.numel() > 1 and torch.isfinite(w).all() else float("nan")
    if not torch.isfinite(w).all() or not 1e-6 < spread < 10.0:
        raise G4SegError(NO_PROJECTION.format(source=source) + f" (its text_projection looks uninitialised: "
                         f"spread {spread:.3g})")


class ComfyTextTower:
    """prompts -> [N, D] projected text embeddings through ComfyUI's CLIP object."""

    def __init__(self, clip):
        name, tower = openclip_text_tower(clip)
        projection = getattr(getattr(tower, "transformer", None), "text_projection", None)
        if projection is None or getattr(projection, "weight", None) is None:
            raise G4SegError(NO_PROJECTION.format(source=f"ComfyUI CLIP {name}"))
        check_projection(projection.weight, f"ComfyUI CLIP {name}")
        self.clip = clip
        self.name = f"ComfyUI CLIP {name}"
        self.width = int(projection.weight.shape[0])

    @torch.no_grad()
    def __call__(self, prompts):
        out = []
        bar = Progress(len(prompts))  # the first run of a class list encodes many prompts: show it
        for prompt in prompts:
            check_interrupt()
            bar.update(1)
            _, pooled = self.clip.encode_from_tokens(self.clip.tokenize(escape_prompt(prompt)), return_pooled=True)
            if pooled is None:
                raise G4SegError(f"{self.name} returned no pooled embedding: {COMFY_SD1}")
            out.append(pooled.float().reshape(-1).cpu())
        return torch.stack(out)


# Query embeddings per text encoder (and its LoRA patches): re-running a graph re-encodes nothing.
_TEXT_CACHE: Dict[tuple, QueryEmbeddings] = {}


def query_embeddings(clip) -> QueryEmbeddings:
    key = (id(clip.cond_stage_model), getattr(getattr(clip, "patcher", None), "patches_uuid", None))
    if key not in _TEXT_CACHE:
        if len(_TEXT_CACHE) >= 4:
            _TEXT_CACHE.pop(next(iter(_TEXT_CACHE)))
        tower = ComfyTextTower(clip)
        cached = QueryEmbeddings(tower, tower.name)
        cached.width = tower.width
        _TEXT_CACHE[key] = cached
    return _TEXT_CACHE[key]
