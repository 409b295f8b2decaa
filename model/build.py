"""One entry point from a `model:` config to a ready hybrid model and its tokenizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fingpt_federated.model.backbone import is_quantized, load_backbone
from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.lora import apply_lora
from fingpt_federated.model.vocabulary import add_finance_vocabulary


def build_model(
    model_cfg: Mapping[str, Any] | ModelConfig, num_classes: int, num_features: int
) -> tuple[HybridFinGPT, PreTrainedTokenizerBase]:
    """Backbone + finance vocabulary + LoRA + series encoder + fusion + head.

    Deterministic in `model_cfg.seed` (the caller's RNG is left untouched), so every bank that
    builds from the same config starts from the same weights. `num_features=0` gives a text-only
    model. The model is on the CPU unless the backbone was loaded 4-bit onto a GPU: then all of it
    is on that GPU (a 4-bit backbone cannot move, so the hybrid parts join it).
    """
    cfg = ModelConfig.from_mapping(model_cfg)
    if not isinstance(cfg.max_length, int):  # `auto` is resolved on the training texts (model/text_length.py)
        raise ValueError("model.max_length=auto is resolved by fingpt-sim and bench_centralized; set a number here")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone, tokenizer, family = load_backbone(cfg)
        term_ids = add_finance_vocabulary(tokenizer, backbone) if cfg.vocabulary.enabled else []
        if is_quantized(backbone):
            from peft import prepare_model_for_kbit_training

            backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
        lora_backbone = apply_lora(backbone, cfg.lora, cfg.seed)
        model = HybridFinGPT(lora_backbone, family, cfg, num_classes, num_features, term_ids)
    if is_quantized(lora_backbone):
        model.to(next(lora_backbone.parameters()).device)
    return model, tokenizer
