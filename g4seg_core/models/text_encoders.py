"""The checkpoints' text encoders: building them from config and encoding a prompt like each family does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch


@dataclass
class PromptEmbedding:
    hidden_states: torch.Tensor  # [1, 77, D] context for the UNet's cross-attention
    pooled: Optional[torch.Tensor]  # [1, P] SDXL's pooled text embedding, else None
    token_ids: List[int]  # the prompt's ids, start token .. end token (unpadded); index = position


def text_core(model):
    """The module holding embeddings/encoder/final_layer_norm (transformers >= 5.6 flattened CLIPTextModel)."""
    return getattr(model, "text_model", model)


def config_values(config: Mapping) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _text_class(config: Mapping):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    archs = config.get("architectures") or ["CLIPTextModel"]
    return CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel


def build_text_encoder(config: Mapping):
    from transformers import CLIPTextConfig

    values = config_values(config)
    values.pop("model_type", None)
    return _text_class(values)(CLIPTextConfig(**values))
