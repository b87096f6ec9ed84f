"""CLIP image encoder weights (transformers or open_clip layouts) -> DenseCLIPFeatures, offline."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..errors import G4SegError
from .state_dicts import assign_weights, load_state_dict_file

log = logging.getLogger("g4seg")


def _heads_for_width(width: int) -> int:
    """Attention heads of a CLIP ViT, which shapes cannot tell: open_clip's head widths.

    64-wide heads except ViT-H (1280 wide, 80-wide heads) and ViT-bigG (1664, 104).
    """
    head_width = {1280: 80, 1664: 104}.get(int(width), 64)
    if width % head_width:
        raise G4SegError(f"cannot infer the number of attention heads of a {width}-wide CLIP ViT: give it by "
                         "open_clip model name, e.g. 'ViT-B-16:/path/to/weights'")
    return width // head_width


def _strip_to(state_dict: Mapping[str, torch.Tensor], anchor: str,
              companions: Sequence[str] = ()) -> Optional[Dict[str, torch.Tensor]]:
    """Keys below the prefix that precedes `anchor` (e.g. 'visual.' or 'model.visual.'), prefix removed.

    The prefix must also hold every key in `companions` (so a ResNet's inner conv1 is no match).
    """
    for key in state_dict:
        if key.endswith(anchor):
            prefix = key[: len(key) - len(anchor)]
            if all(prefix + c in state_dict for c in companions):
                return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return None


def layer_count(keys, pattern: str) -> int:
    """1 + the highest layer index that `pattern` (one group) finds in the keys; 0 when none."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for m in (regex.match(k) for k in keys) if m}
    return max(found) + 1 if found else 0


def is_openai_weights(state_dict: Mapping, path: Path) -> bool:
    """OpenAI's CLIP was trained with QuickGELU; their state dicts carry these metadata entries."""
    name = path.name.lower()
    return ("openai" in name or "quickgelu" in name
            or any(k in state_dict for k in ("input_resolution", "context_length", "vocab_size")))


def _clip_vision_transformers(vision: Dict[str, torch.Tensor], path: Path, device, dtype):
    """transformers CLIP vision weights (vision_model.*, visual_projection.weight) -> DenseCLIPFeatures."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    from ..models.clip_features import DenseCLIPFeatures

    pre = "vision_model."
    try:
        width = int(vision[pre + "embeddings.class_embedding"].shape[0])
        patch = int(vision[pre + "embeddings.patch_embedding.weight"].shape[-1])
        positions = int(vision[pre + "embeddings.position_embedding.weight"].shape[0])
        mlp = int(vision[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise G4SegError(f"{path.name}: incomplete CLIP vision weights (missing {exc})") from exc
    grid = math.isqrt(positions - 1)
    layers = layer_count(vision, r"vision_model\.encoder\.layers\.(\d+)\.")
    projection = vision.get("visual_projection.weight")
    name = path.name.lower()
    # Activation is not in the weights: OpenAI's ViTs (B, L: width <= 1024) use QuickGELU, LAION's
    # ViT-H / bigG (ComfyUI's clip_vision_h / clip_vision_g) use GELU; file names can say otherwise.
    quick = ("laion" not in name and "datacomp" not in name and width <= 1024) or "openai" in name
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                              num_attention_heads=_heads_for_width(width), image_size=grid * patch, patch_size=patch,
                              projection_dim=int(projection.shape[0]) if projection is not None else width,
                              hidden_act="quick_gelu" if quick else "gelu", layer_norm_eps=1e-5)
    cls = CLIPVisionModelWithProjection if projection is not None else CLIPVisionModel
    with torch.device("meta"):
        model = cls(config)
    expected = set(model.state_dict())
    weights = {}
    for key, value in vision.items():
        if key.endswith("position_ids"):
            continue
        if key not in expected and key.startswith(pre) and key[len(pre):] in expected:
            key = key[len(pre):]  # a model class without the vision_model wrapper
        weights[key] = value
    assign_weights(model, weights, "CLIP vision", path.name)
    desc = f"{path.name} (ViT {width}w/{layers}L/{patch}px patches, {grid * patch}px, transformers)"
    log.info("CLIP vision: %s, %s", desc, "QuickGELU" if quick else "GELU")
    return DenseCLIPFeatures.from_transformers(model, name=desc).to(device, dtype)


def _clip_vision_open_clip(visual: Dict[str, torch.Tensor], path: Path, quick: bool, device, dtype):
    """open_clip ViT weights (visual.* prefix removed) -> DenseCLIPFeatures, architecture from shapes."""
    from open_clip.transformer import QuickGELU, VisionTransformer

    from ..models.clip_features import DenseCLIPFeatures

    try:
        width, _, patch, _ = visual["conv1.weight"].shape
        positions = int(visual["positional_embedding"].shape[0])
        mlp = int(visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except KeyError as exc:
        raise G4SegError(f"{path.name}: not an open_clip ViT image encoder (missing {exc}); ResNet/ConvNeXt "
                         "CLIP models are not supported") from exc
    grid = math.isqrt(positions - 1)
    layers = layer_count(visual, r"transformer\.resblocks\.(\d+)\.")
    proj = visual.get("proj")
    ratio = mlp / width
    if int(width * ratio) != mlp:  # float round-off (bigG: 8192 / 1664)
        ratio = (mlp + 0.5) / width
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = VisionTransformer(image_size=grid * patch, patch_size=int(patch), width=int(width), layers=layers,
                                  heads=_heads_for_width(int(width)), mlp_ratio=ratio,
                                  output_dim=int(proj.shape[1]) if proj is not None else int(width),
                                  act_layer=QuickGELU if quick else torch.nn.GELU)
    if proj is None:
        model.proj = None
    assign_weights(model, dict(visual), "CLIP vision", path.name)
    desc = f"{path.name} (open_clip ViT {width}w/{layers}L/{patch}px patches, {grid * patch}px)"
    log.info("CLIP vision: %s, %s", desc, "QuickGELU" if quick else "GELU")
    return DenseCLIPFeatures.from_open_clip(model, name=desc).to(device, dtype)


def split_clip_spec(spec: Union[str, Path]) -> Tuple[Optional[str], str]:
    """'ViT-B-16:/path/w.bin' -> ('ViT-B-16', '/path/w.bin'); a plain path -> (None, path).

    A prefix counts as a model name only when it is not itself a path (Windows drive letters).
    """
    text = str(spec)
    if ":" in text and not Path(text).exists():
        name, rest = text.split(":", 1)
        if name and "/" not in name and "\\" not in name and len(name) > 1:
            return name, rest
    return None, text


def load_clip_vision(path_or_name: Union[str, Path], device="cpu", dtype: torch.dtype = torch.float32):
    """CLIP image encoder -> clip_features.DenseCLIPFeatures, from local files only.

    Accepts (a) transformers-format CLIP vision weights as kept in ComfyUI's models/clip_vision
    (keys vision_model.*, visual_projection.weight; ViT-B/L/H/bigG, 224 or 336 px inferred from
    the shapes) or a transformers folder with config.json; (b) open_clip checkpoints (visual.*
    keys or full CLIP state dicts; architecture inferred from the shapes); (c) an open_clip model
    name and a weights file, "ViT-B-16:/path/open_clip_pytorch_model.bin".
    QuickGELU vs GELU cannot be read from weights: OpenAI checkpoints (metadata keys, 'openai' in
    the file name, or a '-quickgelu' model name) use QuickGELU, others GELU.
    """
    name, file = split_clip_spec(path_or_name)
    path = Path(os.path.expanduser(file))
    if name and name.lower().startswith("hf-hub"):
        raise G4SegError("hf-hub: model names would download weights; give a local weights file instead")
    if not path.exists():
        raise G4SegError(f"CLIP image encoder weights {path} do not exist")
    if name:
        return _clip_vision_named(name, path, device, dtype)
    if path.is_dir():
        if (path / "config.json").is_file():
            from transformers import CLIPVisionModelWithProjection

            from ..models.clip_features import DenseCLIPFeatures

            try:
                model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise G4SegError(f"could not load the CLIP vision folder {path}: {str(exc)[:300]}") from exc
            return DenseCLIPFeatures.from_transformers(model.float(), name=path.name).to(device, dtype)
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        if not candidates:
            raise G4SegError(f"{path} holds no CLIP weights (config.json, *.safetensors, *.bin)")
        path = candidates[0]
    state_dict = load_state_dict_file(path)
    vision = _strip_to(state_dict, "vision_model.embeddings.class_embedding")
    if vision is not None:
        vision = {k: v for k, v in vision.items() if k.startswith(("vision_model.", "visual_projection."))}
        return _clip_vision_transformers(vision, path, device, dtype)
    visual = _strip_to(state_dict, "conv1.weight", ("positional_embedding", "class_embedding"))
    if visual is not None:
        return _clip_vision_open_clip(visual, path, is_openai_weights(state_dict, path), device, dtype)
    if any(".layer1." in k or "attnpool" in k for k in state_dict):
        raise G4SegError(f"{path.name} is a ResNet CLIP; G4Seg needs a ViT image encoder (ViT-B/16, ViT-L/14, ...)")
    raise G4SegError(f"{path.name} is not a CLIP image encoder G4Seg recognises (expected vision_model.* "
                     "transformers keys or visual.* open_clip keys)")


def _clip_vision_named(name: str, path: Path, device, dtype):
    import open_clip

    from ..models.clip_features import DenseCLIPFeatures

    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if m.lower().startswith(name.lower()[:5])][:8]
        raise G4SegError(f"{name!r} is not an open_clip model name; e.g. {close or ['ViT-B-16', 'ViT-L-14']}")
    if not path.is_file():
        raise G4SegError(f"{path} is not a weights file")
    state_dict = load_state_dict_file(path)
    quick = name.endswith("quickgelu") or is_openai_weights(state_dict, path)
    try:
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    except Exception as exc:
        raise G4SegError(f"open_clip could not build {name!r}: {exc}") from exc
    visual = _strip_to(state_dict, "conv1.weight", ("positional_embedding",)) or {}
    if hasattr(model.visual, "proj") and model.visual.proj is None:
        visual.pop("proj", None)
    assign_weights(model.visual, visual, f"{name} image encoder", path.name, assign=False)
    return DenseCLIPFeatures.from_open_clip(model.visual, name=f"{name} ({path.name})").to(device, dtype)
