"""CLIP text embeddings of class names: text towers, template averaging, loading them from files.

A class name becomes one embedding by the recipe of CLIP's zero-shot classifier: the name is put
into every prompt template, each prompt's projected end-of-text embedding is L2-normalised, the
embeddings are averaged and the mean is L2-normalised again.

Text towers, all `tower(prompts) -> [N, D]` projected (unnormalised) embeddings:
  * `OpenCLIPTextTower`: open_clip-format weights — an open_clip CLIP file, or the text tower an
    SD2.x checkpoint (`cond_stage_model.model.*`, OpenCLIP ViT-H/14) or SDXL checkpoint
    (`conditioner.embedders.1.model.*`, OpenCLIP ViT-bigG/14) carries with its `text_projection`;
  * `TransformersTextTower`: transformers' CLIPTextModelWithProjection (SDXL diffusers folders);
  * in ComfyUI, the node wraps the CLIP object (`nodes/text_to_mask_node.py`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..loading.detection import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT2_PREFIX
from ..errors import G4SegError
from ..models.tokenizer import G4SegTokenizer

log = logging.getLogger("g4seg")

# Which vision file goes with a text tower of this embedding width (for error messages).
MATCHING_VISION = {
    1024: "the OpenCLIP ViT-H/14 image encoder (ComfyUI: clip_vision_h.safetensors; SD2.x text)",
    1280: "the OpenCLIP ViT-bigG/14 image encoder (ComfyUI: clip_vision_g.safetensors; SDXL text)",
    768: "a ViT-L/14 image encoder",
    512: "a ViT-B/16 or ViT-B/32 image encoder",
}
SD1_NO_PROJECTION = (
    "SD1.x's text encoder (CLIP ViT-L/14 as SD1 stores it) has no text_projection, so its embeddings cannot be "
    "compared with image embeddings. Use an SD2.x checkpoint's text encoder with clip_vision_h.safetensors, "
    "SDXL's (clip_g) with clip_vision_g.safetensors, or a full open_clip CLIP file "
    "(e.g. --text 'ViT-B-16:/path/open_clip_pytorch_model.bin')")
NO_PROJECTION = (
    "{source}: the text encoder has no text_projection (checkpoints converted through diffusers lose it; ComfyUI "
    "then leaves it uninitialised without a warning). Load the original single-file SD2.x/SDXL checkpoint "
    "(e.g. v2-1_512-ema-pruned.safetensors) or a full open_clip CLIP file instead")


def class_embedding(tower: Callable[[List[str]], torch.Tensor], names: Sequence[str],
                    templates: Sequence[str]) -> torch.Tensor:
    """[len(names), D]: per name, normalise(mean_t(normalise(tower(template_t(name)))))."""
    prompts = [template.replace("{}", name) for name in names for template in templates]
    emb = F.normalize(tower(prompts).float(), dim=-1).reshape(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


class QueryEmbeddings:
    """Embeddings of query words, cached per (word, templates) for one text tower."""

    def __init__(self, tower: Callable[[List[str]], torch.Tensor], name: str = "text"):
        self.tower = tower
        self.name = name
        self.cache: Dict[Tuple[str, Tuple[str, ...]], torch.Tensor] = {}

    def __call__(self, words: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        templates = tuple(templates)
        missing = [w for w in dict.fromkeys(words) if (w, templates) not in self.cache]
        if missing:
            for word, emb in zip(missing, class_embedding(self.tower, missing, templates)):
                self.cache[(word, templates)] = emb.cpu()
        return torch.stack([self.cache[(w, templates)] for w in words])


def check_widths(text_width: int, vision_width: int, text_name: str = "text encoder",
                 vision_name: str = "CLIP vision model") -> None:
    """Text and image embeddings must come from the two towers of one CLIP (equal widths at least)."""
    if int(text_width) == int(vision_width):
        return
    want = MATCHING_VISION.get(int(text_width), f"an image encoder with {text_width}-wide embeddings")
    raise G4SegError(f"the {text_name} gives {text_width}-wide embeddings but the {vision_name} gives "
                     f"{vision_width}-wide ones: they must be the two halves of one CLIP model. With this text "
                     f"encoder use {want}")


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class OpenCLIPTextTower:
    """An open_clip text transformer (or CLIP model) -> projected end-of-text embeddings.

    Prompts are padded only to the longest prompt of a batch, not to 77: the attention is causal,
    so the end-of-text token never sees the padding after it and the result is the same.
    """

    def __init__(self, module: torch.nn.Module, name: str = "open_clip text", batch_size: int = 64):
        for part in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(module, part):
                raise G4SegError(f"{type(module).__name__} is not an open_clip text tower (no {part})")
        if getattr(module, "text_projection", None) is None:
            raise G4SegError(NO_PROJECTION.format(source=name))
        self.module = module.eval()
        self.name = name
        self.batch_size = int(batch_size)
        self.tokenizer = G4SegTokenizer(pad_token_id=0)  # open_clip pads with 0
        projection = module.text_projection
        self.width = int(projection.out_features if isinstance(projection, torch.nn.Linear) else projection.shape[1])
        self.batch_first = getattr(module.transformer, "batch_first", True)

    @property
    def device(self) -> torch.device:
        return self.module.token_embedding.weight.device

    @torch.no_grad()
    def __call__(self, prompts: List[str]) -> torch.Tensor:
        out = []
        for chunk in _batches(list(prompts), self.batch_size):
            ids = [self.tokenizer.prompt_ids(p) for p in chunk]
            length = max(len(i) for i in ids)
            tokens = torch.tensor([i + [0] * (length - len(i)) for i in ids], device=self.device)
            out.append(self._encode(tokens).float().cpu())
        return torch.cat(out)

    def _encode(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.module
        n = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:n].to(m.token_embedding.weight.dtype)
        causal = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in m.transformer.resblocks:
            x = block(x, attn_mask=causal)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # end-of-text: the highest id
        projection = m.text_projection
        return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection


class TransformersTextTower:
    """transformers CLIPTextModelWithProjection -> `text_embeds` (projected end-of-text embedding)."""

    def __init__(self, model: torch.nn.Module, name: str = "transformers text", pad_token_id: int = 0,
                 batch_size: int = 64):
        if not hasattr(model, "text_projection"):
            raise G4SegError(NO_PROJECTION.format(source=name))
        self.model = model.eval()
        self.name = name
        self.batch_size = int(batch_size)
        self.pad = int(pad_token_id)
        self.tokenizer = G4SegTokenizer(pad_token_id=self.pad)
        self.width = int(model.text_projection.weight.shape[0])

    @torch.no_grad()
    def __call__(self, prompts: List[str]) -> torch.Tensor:
        out = []
        device = self.model.text_projection.weight.device
        for chunk in _batches(list(prompts), self.batch_size):
            ids = [self.tokenizer.prompt_ids(p) for p in chunk]
            length = max(len(i) for i in ids)
            tokens = torch.tensor([i + [self.pad] * (length - len(i)) for i in ids], device=device)
            out.append(self.model(input_ids=tokens).text_embeds.float().cpu())
        return torch.cat(out)


# ---------------------------------------------------------------------------- loading from files
_TEXT_PARTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _open_clip_text_prefix(state_dict) -> Optional[str]:
    """The prefix of open_clip-format text weights (token_embedding + ln_final + positional_embedding)."""
    for key in state_dict:
        if key.endswith("token_embedding.weight"):
            prefix = key[: -len("token_embedding.weight")]
            if prefix + "ln_final.weight" in state_dict and prefix + "positional_embedding" in state_dict:
                return prefix
    return None


def open_clip_text_from_state_dict(state_dict, source: str, quick_gelu: bool = False, device="cpu",
                                   dtype: torch.dtype = torch.float32) -> OpenCLIPTextTower:
    """Build an open_clip TextTransformer from the shapes of open_clip-format text weights and load them."""
    from open_clip.transformer import QuickGELU, TextTransformer

    from ..loading.clip_loading import layer_count
    from ..loading.state_dicts import assign_weights

    prefix = _open_clip_text_prefix(state_dict)
    if prefix is None:
        if any(k.startswith(SD1_TEXT_PREFIX) for k in state_dict):
            raise G4SegError(f"{source}: {SD1_NO_PROJECTION}")
        raise G4SegError(f"{source} holds no CLIP text encoder G4Seg can use (expected open_clip-format text weights: "
                         "an SD2.x/SDXL single-file checkpoint or a full open_clip CLIP file)")
    if prefix + "text_projection" not in state_dict and prefix + "text_projection.weight" not in state_dict:
        raise G4SegError(NO_PROJECTION.format(source=source))
    weights = {k[len(prefix):]: v for k, v in state_dict.items()
               if k.startswith(prefix) and k[len(prefix):].startswith(_TEXT_PARTS)}
    vocab, width = weights["token_embedding.weight"].shape
    context = int(weights["positional_embedding"].shape[0])
    layers = layer_count(weights, r"transformer\.resblocks\.(\d+)\.")
    mlp = int(weights["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    projection = weights.get("text_projection")
    linear = projection is None
    out_dim = int(weights["text_projection.weight"].shape[0]) if linear else int(projection.shape[1])
    heads = max(1, int(width) // 64)
    with torch.device("meta"):
        module = TextTransformer(context_length=context, vocab_size=int(vocab), width=int(width), heads=heads,
                                 layers=layers, mlp_ratio=mlp / int(width), output_dim=out_dim,
                                 proj_bias="text_projection.bias" in weights,
                                 no_causal_mask=True,  # no mask buffer to fill; OpenCLIPTextTower masks itself
                                 act_layer=QuickGELU if quick_gelu else torch.nn.GELU)
    if linear and not isinstance(module.text_projection, torch.nn.Linear):
        weights["text_projection"] = weights.pop("text_projection.weight").t()
    assign_weights(module, weights, "CLIP text encoder", source)
    desc = f"{source} ({prefix or 'open_clip '}text tower {width}w/{layers}L -> {out_dim})"
    log.info("CLIP text: %s, %s", desc, "QuickGELU" if quick_gelu else "GELU")
    return OpenCLIPTextTower(module.to(device=device, dtype=dtype), name=desc)


def _diffusers_text(root: Path, device, dtype):
    from transformers import CLIPTextModelWithProjection

    for sub in ("text_encoder_2", "text_encoder"):
        config = root / sub / "config.json"
        if config.is_file() and "CLIPTextModelWithProjection" in config.read_text():
            try:
                model = CLIPTextModelWithProjection.from_pretrained(str(root / sub), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise G4SegError(f"could not load {root / sub}: {str(exc)[:300]}") from exc
            return TransformersTextTower(model.to(device=device, dtype=dtype), name=f"{root.name}/{sub}")
    if (root / "text_encoder" / "config.json").is_file():
        text = (root / "text_encoder" / "config.json").read_text()
        if '"quick_gelu"' in text and (root / "text_encoder_2").exists() is False:
            raise G4SegError(f"{root.name}: {SD1_NO_PROJECTION}")
        raise G4SegError(NO_PROJECTION.format(source=root.name))
    raise G4SegError(f"{root} holds no CLIP text encoder (no text_encoder/ or text_encoder_2/ folder)")


def load_text_tower(path_or_spec: Union[str, Path], device="cpu", dtype: torch.dtype = torch.float32):
    """A CLIP text tower with its projection, from local files only.

    Accepts an SD2.x or SDXL single-file checkpoint (its OpenCLIP text tower), a full open_clip CLIP
    file (also 'ViT-B-16:/path/weights.bin'; OpenAI weights -> QuickGELU, as for the image encoder)
    or an SDXL diffusers folder. SD1.x checkpoints and diffusers-converted SD2.x files are errors
    that say what to load instead.
    """
    from ..loading.clip_loading import is_openai_weights, split_clip_spec
    from ..loading.state_dicts import load_state_dict_file

    name, file = split_clip_spec(path_or_spec)
    path = Path(os.path.expanduser(file))
    if not path.exists():
        raise G4SegError(f"text encoder weights {path} do not exist")
    if path.is_dir():
        return _diffusers_text(path, device, dtype)
    state_dict = load_state_dict_file(path)
    quick = bool(name and name.endswith("quickgelu")) or is_openai_weights(state_dict, path)
    if any(k.startswith(SD2_TEXT_PREFIX) for k in state_dict) or any(k.startswith(SDXL_TEXT2_PREFIX) for k in state_dict):
        quick = False  # LAION OpenCLIP towers (SD2.x: ViT-H/14, SDXL: ViT-bigG/14) use GELU
    return open_clip_text_from_state_dict(state_dict, path.name, quick, device, dtype)
