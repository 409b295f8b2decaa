"""Texts against `model.max_length`: a warning when texts would be cut, and `max_length: auto`.

Tokenisation truncates every text to `max_length` tokens (data/batching.py); this module makes it
never silent. Before a run trains, each data set's texts are tokenised in full with the run's own
tokenizer (finance vocabulary included) and a data set with texts longer than `max_length` gets one
warning with their count and the longest length. `auto` is the length that covers 99% of the
training texts, capped at the backbone's limit (its position embeddings).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from fingpt_federated.model.backbone import load_backbone
from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.vocabulary import add_finance_vocabulary

log = logging.getLogger(__name__)

AUTO = "auto"
COVERAGE = 0.99


def token_lengths(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> np.ndarray:
    """Tokens of each text, special tokens included, as the model would see it without truncation."""
    return np.array([len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]], dtype=np.int64)


def covering_length(lengths: np.ndarray, limit: int, coverage: float = COVERAGE) -> int:
    """The smallest length that `coverage` of `lengths` fit in, at most `limit`."""
    needed = int(np.sort(lengths)[max(0, math.ceil(coverage * len(lengths)) - 1)])
    return max(1, min(needed, limit))


def truncation_warning(name: str, lengths: np.ndarray, max_length: int, auto: bool = False) -> str | None:
    """The warning for one data set, or None when every text fits."""
    cut = int((lengths > max_length).sum())
    if not cut:
        return None
    hint = "set model.max_length to the longest to keep them" if auto else "raise model.max_length or set it to auto"
    return (
        f"{name}: {cut} of {len(lengths)} texts are longer than model.max_length={max_length} tokens "
        f"(longest {int(lengths.max())}); their tails are cut: {hint}"
    )


def resolve_max_length(model_cfg: Mapping[str, Any], texts: Mapping[str, Sequence[str] | None], train: str) -> int:
    """`model.max_length`, with `auto` resolved on `texts[train]`; logs one warning per data set of
    `texts` (name -> its texts) that has texts longer than the result, and the resolved `auto`."""
    cfg = ModelConfig.from_mapping({key: value for key, value in model_cfg.items() if key != "train"})
    present = {name: list(values) for name, values in texts.items() if values}
    if cfg.max_length != AUTO and not present:
        return int(cfg.max_length)
    tokenizer, limit = _tokenizer(cfg)
    lengths = {name: token_lengths(tokenizer, values) for name, values in present.items()}
    if cfg.max_length == AUTO:
        if train not in lengths:
            raise ValueError("model.max_length=auto needs training texts; this data maps none: set a number")
        max_length = covering_length(lengths[train], limit)
        log.warning(
            "model.max_length: auto = %d tokens, covering %.0f%% of the %d training texts "
            "(longest %d, backbone limit %d)",
            max_length,
            100 * float((lengths[train] <= max_length).mean()),
            len(lengths[train]),
            int(lengths[train].max()),
            limit,
        )
    else:
        max_length = int(cfg.max_length)
    for name, values in lengths.items():
        warning = truncation_warning(name, values, max_length, auto=cfg.max_length == AUTO)
        if warning:
            log.warning(warning)
    return max_length


def _tokenizer(cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase, int]:
    """The run's tokenizer (finance terms added as the model builds it) and the backbone's longest input."""
    backbone, tokenizer, _ = load_backbone(cfg)
    if cfg.vocabulary.enabled:
        add_finance_vocabulary(tokenizer, backbone)
    limits = [getattr(backbone.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return tokenizer, min((limit for limit in limits if isinstance(limit, int) and 0 < limit < 1_000_000), default=512)


def with_max_length(cfg: DictConfig, texts: Mapping[str, Sequence[str] | None], train: str) -> DictConfig:
    """A copy of the run's config with `model.max_length` resolved (`auto` -> a number), texts checked;
    the caller saves it as the run's resolved config, so the run records the length it used."""
    resolved = copy.deepcopy(cfg)
    resolved.model.max_length = resolve_max_length(
        cast(dict[str, Any], OmegaConf.to_container(cfg.model, resolve=True)), texts, train
    )
    return resolved
