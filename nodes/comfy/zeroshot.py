"""ComfyUI's own objects as the two towers of words -> coarse mask (ComfyUI-specific engine code).

* `ComfyTextTower`: the CLIP object (the checkpoint's text encoder) -> projected end-of-text
  embeddings. Each prompt is tokenized by `clip.tokenize` (parentheses escaped: ComfyUI reads
  "(word:1.2)" as prompt weighting) and the token rows go through the text tower in batches of
  `batch_size` rows, set up as `clip.encode_from_tokens` sets it up (the same pooled output it
  returns for one prompt, without one call per prompt: 80 templates x 29 words are 2,320 prompts
  on a first run). An SD2.x CLIP is OpenCLIP ViT-H/14's text tower with its projection; SDXL's
  pooled output is clip_g's (bigG).
(The image tower, CLIP_VISION with NACLIP's last block, is clip_vision.comfy_clip_vision_features.)
No ComfyUI import at module level.
"""

from __future__ import annotations

import numbers
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

    def __init__(self, clip, batch_size: int = 64):
        name, tower = openclip_text_tower(clip)
        projection = getattr(getattr(tower, "transformer", None), "text_projection", None)
        if projection is None or getattr(projection, "weight", None) is None:
            raise G4SegError(NO_PROJECTION.format(source=f"ComfyUI CLIP {name}"))
        check_projection(projection.weight, f"ComfyUI CLIP {name}")
        self.clip = clip
        self.tower = tower
        self.key = name[len("clip_"):]  # clip.tokenize's key for this tower: "h" (SD2.x), "g" (SDXL)
        self.batch_size = int(batch_size)
        self.name = f"ComfyUI CLIP {name}"
        self.width = int(projection.weight.shape[0])

    @torch.no_grad()
    def __call__(self, prompts):
        rows = [self._token_row(p) for p in prompts]
        out = [None] * len(prompts)
        bar = Progress(len(prompts))  # the first run of a class list encodes many prompts: show it
        # rows of one length go through the tower together; a row holding an embedding (not plain
        # token ids) is encoded alone, by ComfyUI's own call
        by_length = {}
        for i, row in enumerate(rows):
            by_length.setdefault(len(row) if row is not None else None, []).append(i)
        for length, members in by_length.items():
            for start in range(0, len(members), self.batch_size if length is not None else 1):
                check_interrupt()
                chunk = members[start:start + (self.batch_size if length is not None else 1)]
                pooled = self._encode_rows([rows[i] for i in chunk]) if length is not None \
                    else self.encode_one(prompts[chunk[0]])[None]
                for i, p in zip(chunk, pooled):
                    out[i] = p
                bar.update(len(chunk))
        return torch.stack(out)

    def _token_row(self, prompt: str):
        """The prompt's first 77-token section as ComfyUI tokenizes it, ids only (the pooled output that
        encode_from_tokens returns is the first section's); None when it holds anything but token ids."""
        sections = self.clip.tokenize(escape_prompt(prompt))[self.key]
        row = [token[0] for token in sections[0]]
        weighted = any(len(token) > 1 and token[1] != 1.0 for token in sections[0])
        return None if weighted or not all(isinstance(t, numbers.Integral) for t in row) else [int(t) for t in row]

    def _encode_rows(self, rows) -> torch.Tensor:
        """[len(rows), D]: the tower's pooled outputs, set up as CLIP.encode_from_tokens sets it up."""
        clip, model = self.clip, self.clip.cond_stage_model
        model.reset_clip_options()
        if getattr(clip, "layer_idx", None) is not None:
            model.set_clip_options({"layer": clip.layer_idx})
        clip.load_model()
        model.set_clip_options({"execution_device": clip.patcher.load_device})
        pooled = self.tower.encode(rows)[1]
        if pooled is None:
            raise G4SegError(f"{self.name} returned no pooled embedding: {COMFY_SD1}")
        return pooled.float().cpu()

    @torch.no_grad()
    def encode_one(self, prompt: str) -> torch.Tensor:
        """[D]: one prompt through ComfyUI's own encode_from_tokens (the reference the batches equal)."""
        _, pooled = self.clip.encode_from_tokens(self.clip.tokenize(escape_prompt(prompt)), return_pooled=True)
        if pooled is None:
            raise G4SegError(f"{self.name} returned no pooled embedding: {COMFY_SD1}")
        return pooled.float().reshape(-1).cpu()


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
