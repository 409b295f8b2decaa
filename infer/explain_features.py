"""Per-feature attributions of static features: which attribute (amount, age, purpose...) moved the prediction.

(Input - baseline) x gradient of the predicted class's logit, taken on each feature's token as it
enters the feature encoder's transformer block (model/features.py): one token per feature, built
from that feature alone, so its attribution is that feature's (summed over the token's width). The
baseline token is the feature's token at its neutral value: a number at the training mean, a
category "unknown". Plain input x gradient would credit the feature embedding itself, which every
record shares (measured: an uninformative categorical feature ranked first). The token is
captured by a forward pre-hook that makes it a leaf tensor, as infer/explain.py does for token
embeddings and series steps: the model itself is unchanged. Scores are signed shares of the row's
total |attribution| over its features, the top ones listed by magnitude.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fingpt_federated.data.batching import Batch
from fingpt_federated.model.hybrid import HybridFinGPT


def feature_attributions(model: HybridFinGPT, batch: Batch) -> torch.Tensor | None:
    """(B, F) attribution of every static feature (numeric then categorical), None without features."""
    encoder = model.features
    if encoder is None or (batch.numeric is None and batch.categorical is None):
        return None
    entry: nn.Module = encoder.blocks[0] if len(encoder.blocks) else encoder.ln_out
    captured: list[torch.Tensor] = []

    def as_leaf(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        leaf = args[0].detach().requires_grad_(True)
        captured.append(leaf)
        return (leaf, *args[1:])

    handle = entry.register_forward_pre_hook(as_leaf)
    try:
        with torch.enable_grad():
            logits = model(**batch.inputs())
            chosen = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (gradient,) = torch.autograd.grad(chosen, captured[0])
    finally:
        handle.remove()
    return ((captured[0] - _baseline(model)) * gradient).sum(-1).detach().float().cpu()


@torch.no_grad()
def _baseline(model: HybridFinGPT) -> torch.Tensor:
    """(F, d) the tokens of every feature at its neutral value: standardised 0, or the "unknown" category."""
    encoder = model.features
    assert encoder is not None
    device = encoder.vocabulary.device
    numeric = torch.arange(len(encoder.numeric_names), device=device)
    categorical = torch.arange(len(encoder.categorical_names), device=device)
    unknown = encoder.category(categorical * (encoder.slots + 1)) + encoder.feature(categorical)
    return torch.cat([encoder.value_bias(numeric), unknown])


def top_features(scores: torch.Tensor, names: list[str], top_k: int) -> list[dict[str, Any]]:
    """The `top_k` features of one row by |attribution|, each with its signed share of the row's total."""
    total = float(scores.abs().sum()) or 1.0
    order = scores.abs().argsort(descending=True)[:top_k].tolist()
    return [{"feature": names[j], "score": float(scores[j]) / total} for j in order]
