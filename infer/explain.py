"""Explanations and uncertainty of a batch of predictions.

Attribution is input x gradient of the predicted class's logit, taken on the token embeddings
(the output of the backbone's embedding layer) and on the normalised series steps (the output of
the series normaliser): both are captured by forward hooks that turn the module's output into a
leaf tensor, so nothing in the model changes and the bf16 and bitsandbytes variants are explained
as they run. torch's dynamic int8 layers have no backward (a gradient through them is silently
wrong), so that variant is explained on its fp32 twin (PublishedModel.gradient_model). Per token /
step, the attribution is summed over the embedding or feature axis.

Each explained token carries its character span in the text (`token_offsets`), so the audit log
masks exactly the tokens that overlap PII.

Uncertainty is the entropy of the class probabilities divided by log(classes) (0 = certain,
1 = uniform) and, on request, the spread (standard deviation) of the predicted class's
probability over Monte Carlo dropout samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from fingpt_federated.data.batching import Batch
from fingpt_federated.model.hybrid import HybridFinGPT

MC_SEED = 0


class _Capture:
    """Forward hook: the module's output becomes a leaf that requires grad, kept for reading its gradient."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.value = output.detach().requires_grad_(True)
        return self.value

    def attribution(self, mask: torch.Tensor) -> torch.Tensor:
        """input x gradient summed over the last axis, zero where `mask` is False: (B, steps)."""
        assert self.value is not None and self.value.grad is not None
        scores = (self.value.float() * self.value.grad.float()).sum(-1)
        return scores * mask.to(scores.dtype)


@contextmanager
def _captured(module: nn.Module | None) -> Iterator[_Capture | None]:
    if module is None:
        yield None
        return
    capture = _Capture()
    handle = module.register_forward_hook(capture)
    try:
        yield capture
    finally:
        handle.remove()


def attribute(model: HybridFinGPT, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(logits, token attributions (B, L) or None, series-step attributions (B, T) or None)."""
    embeddings = model.backbone.get_input_embeddings() if batch.input_ids is not None else None
    encoder = model.series_encoder
    normalizer = encoder.normalizer if batch.series is not None and encoder is not None else None
    with _captured(embeddings) as tokens, _captured(normalizer) as steps, torch.enable_grad():
        logits = model(**batch.inputs())
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    token_scores = step_scores = None
    if tokens is not None:
        assert batch.attention_mask is not None  # collated with the token ids
        token_scores = tokens.attribution(batch.attention_mask)
    if steps is not None:
        assert batch.series_mask is not None  # collated with the series
        step_scores = steps.attribution(batch.series_mask)
    return logits.detach(), token_scores, step_scores


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, ids: list[int], max_length: int
) -> list[tuple[int, int]] | None:
    """The character span in `text` of each of `ids` (the row as the model saw it: special tokens
    added, truncated to `max_length`); None where the tokenizer gives no offsets (a slow one) or
    tokenising `text` again does not give `ids`."""
    if not tokenizer.is_fast:
        return None
    encoded = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        return None
    return [(int(start), int(end)) for start, end in encoded["offset_mapping"]]


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy of each row divided by log(classes): in [0, 1]."""
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
    return entropy / math.log(probabilities.shape[-1])


@torch.inference_mode()
def mc_dropout_spread(model: HybridFinGPT, batch: Batch, predicted: torch.Tensor, samples: int) -> torch.Tensor:
    """Std of the predicted class's probability over `samples` passes with dropout on (seeded)."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MC_SEED)
        for layer in dropouts:
            layer.train()
        try:
            runs = torch.stack([model(**batch.inputs()).float().softmax(-1) for _ in range(samples)])
        finally:
            for layer in dropouts:
                layer.eval()
    return runs.gather(2, predicted.view(1, -1, 1).expand(samples, -1, 1)).squeeze(-1).std(0, correction=0)
