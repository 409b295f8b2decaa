"""Explanations and uncertainty of a batch of predictions.

Attribution is input x gradient of the predicted class's logit, taken on the token embeddings
(the output of the backbone's embedding layer) and on the normalised series steps (the output of
the series normaliser): both are captured by forward hooks that turn the module's output into a
leaf tensor, so nothing in the model changes and the bf16 and bitsandbytes variants are explained
as they run. torch's dynamic int8 layers have no backward (a gradient through them is silently
wrong), so that variant is explained on its fp32 twin (PublishedModel.gradient_model). Per token /
step, the attribution is summed over the embedding or feature axis.

Text is explained at word level (`top_words`): the word pieces of one word (the tokens whose spans
fall in one word of the text: letters, digits and inner `.,'-` as in "3.5" or "U.S.-based") are
merged, their attributions summed, and each word keeps its character span (`start`, `end`) and its
text, so the audit log masks exactly the words that overlap PII (privacy/audit.py checks the span
against the text). A word's score is its signed share of the row's total |attribution| over every
token. Punctuation and stop words (English function words, without the negations and directions
that carry financial meaning: not, no, up, down, above, below, ...) stay out of the top list unless
they CARRY the attribution: a share of at least CARRY_SHARE (a quarter) of the row's total. Without
offsets (a slow tokenizer) WordPiece "##" continuations are merged and words have no span.
Static features are explained per feature (infer/explain_features.py), series per step.

Uncertainty is the entropy of the class probabilities divided by log(classes) (0 = certain,
1 = uniform) and, on request, the spread (standard deviation) of the predicted class's
probability over Monte Carlo dropout samples.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from torch import nn
from transformers import PreTrainedTokenizerBase

from fingpt_federated.data.batching import Batch
from fingpt_federated.model.hybrid import HybridFinGPT

MC_SEED = 0
CARRY_SHARE = 0.25
"""A punctuation mark or stop word is listed among the top words only with at least this share of the row's
total |attribution|: then it carries the prediction (e.g. a "not"-less "no" would be kept anyway, see MEANINGFUL)."""
MEANINGFUL = frozenset(
    "not no nor never none nothing cannot without against up down above below over under off out less more "
    "least most few fewer only".split()
)
STOP_WORDS = frozenset(ENGLISH_STOP_WORDS) - MEANINGFUL
_WORD = re.compile(r"\w+(?:[.,'\-]\w+)*")
_PIECE_MARKS = ("##", "\u2581", "\u0120")  # WordPiece continuation; SentencePiece and byte-level BPE word starts


@dataclass(frozen=True)
class Word:
    text: str
    position: int  # index of its first token in the row
    score: float  # signed share of the row's total |attribution|
    pieces: int
    start: int | None = None
    end: int | None = None

    def filler(self) -> bool:
        """Punctuation, a symbol or a stop word: listed only when it carries the attribution."""
        return not any(ch.isalnum() for ch in self.text) or self.text.lower() in STOP_WORDS

    def to_dict(self) -> dict[str, object]:
        place = {} if self.start is None else {"start": self.start, "end": self.end}
        return {"token": self.text, "position": self.position, "score": self.score, "pieces": self.pieces, **place}


def merge_words(
    text: str | None,
    positions: Sequence[int],
    pieces: Sequence[str],
    scores: Sequence[float],
    spans: Sequence[tuple[int, int]] | None,
) -> list[Word]:
    """The row's words from its (non-special) tokens: `positions` in the row, their `pieces`, raw `scores` and
    character `spans` in `text` (all tokens of the row, None without offsets)."""
    total = sum(abs(v) for v in scores) or 1.0
    groups: list[list[int]] = []
    keys: list[object] = []
    for j, position in enumerate(positions):
        key = _word_key(text, spans[position] if spans else None, pieces[j], j, keys[-1] if keys else None)
        if groups and key == keys[-1]:
            groups[-1].append(j)
        else:
            groups.append([j])
            keys.append(key)
    words = []
    for key, group in zip(keys, groups, strict=True):
        score = sum(scores[j] for j in group) / total
        if isinstance(key, tuple) and text is not None:
            words.append(Word(text[key[0] : key[1]], positions[group[0]], score, len(group), key[0], key[1]))
        else:
            words.append(Word(_joined([pieces[j] for j in group]), positions[group[0]], score, len(group)))
    return words


def top_words(words: Sequence[Word], k: int) -> list[Word]:
    """The `k` words of largest |score|, fillers only where they carry the attribution (CARRY_SHARE)."""
    listed = [w for w in words if not w.filler() or abs(w.score) >= CARRY_SHARE]
    return sorted(listed, key=lambda w: -abs(w.score))[:k]


def _word_key(text: str | None, span: tuple[int, int] | None, piece: str, index: int, previous: object) -> object:
    """What groups a token with its neighbours: the span of the text word its span starts in; without offsets,
    the previous token's key for a continuation piece, else its own index."""
    if text is not None and span is not None and span[1] > span[0]:
        for match in _WORD.finditer(text, max(0, span[0] - 64)):
            if match.start() <= span[0] < match.end():
                return (match.start(), match.end())
            if match.start() > span[0]:
                break
        return span  # punctuation and symbols: a word of their own
    return previous if previous is not None and piece.startswith("##") else index


def _joined(pieces: list[str]) -> str:
    text = "".join(p.removeprefix("##") if i else p for i, p in enumerate(pieces))
    for mark in _PIECE_MARKS[1:]:
        text = text.replace(mark, "")
    return text


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
