"""Predictions of a published model on a BankDataset: probabilities, label, explanation, uncertainty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from fingpt_federated.data.batching import Batch, make_loader
from fingpt_federated.data.records import BankDataset
from fingpt_federated.infer.explain import (
    attribute,
    mc_dropout_spread,
    merge_words,
    normalised_entropy,
    token_offsets,
    top_words,
)
from fingpt_federated.infer.explain_features import feature_attributions, top_features
from fingpt_federated.model.published import PublishedModel

TOP_K = 5


class NonFiniteOutputError(ValueError):
    """The model's output is NaN or infinite: a damaged model, never a prediction to return."""


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]
    uncertainty: dict[str, float]
    explanation: dict[str, Any] | None

    def output(self) -> dict[str, Any]:
        """What the audit log records as the output (the explanation is recorded apart)."""
        return {"label": self.label, "probabilities": self.probabilities, "uncertainty": self.uncertainty}


class Predictor:
    def __init__(self, published: PublishedModel, batch_size: int = 32, top_k: int = TOP_K) -> None:
        self.published = published
        self.model = published.model
        self.tokenizer = published.tokenizer
        self.batch_size = batch_size
        self.top_k = top_k
        self._special = set(self.tokenizer.all_special_ids)

    def predict(
        self, data: BankDataset, *, explain: bool = True, mc_samples: int = 0, progress: bool = False
    ) -> list[Prediction]:
        loader = make_loader(data, self.tokenizer, self.model.config.max_length, self.batch_size, shuffle=False)
        texts = list(data.texts) if data.texts is not None else []
        results: list[Prediction] = []
        for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
            rows = texts[len(results) : len(results) + len(batch)]  # the loader keeps the data's order
            results += self._predict_batch(batch.to(self.published.device), explain, mc_samples, rows)
        return results

    def _predict_batch(self, batch: Batch, explain: bool, mc_samples: int, texts: list[str]) -> list[Prediction]:
        logits = tokens = steps = None
        static = feature_attributions(self.published.gradient_model, batch) if explain else None
        if explain:
            logits, tokens, steps = attribute(self.published.gradient_model, batch)
        if logits is None or self.published.gradient_model is not self.model:
            with torch.inference_mode():
                logits = self.model(**batch.inputs())
        probabilities = logits.float().softmax(-1).cpu()
        if not torch.isfinite(probabilities).all():
            raise NonFiniteOutputError(
                f"{self.published.folder}: the model gave non-finite probabilities (its weights overflow or are "
                "damaged); no prediction is returned"
            )
        predicted = probabilities.argmax(-1)
        entropy = normalised_entropy(probabilities)
        spread = (
            mc_dropout_spread(self.model, batch, predicted.to(logits.device), mc_samples).cpu()
            if mc_samples > 0
            else None
        )
        names = self.published.class_names
        return [
            Prediction(
                label=names[int(predicted[i])],
                probabilities={name: float(p) for name, p in zip(names, probabilities[i], strict=True)},
                uncertainty={
                    "entropy": float(entropy[i]),
                    **({"mc_dropout_std": float(spread[i])} if spread is not None else {}),
                },
                explanation=self._explanation(batch, i, tokens, steps, texts[i] if texts else None)
                | self._features(static, i)
                if explain
                else None,
            )
            for i in range(len(predicted))
        ]

    def _explanation(
        self, batch: Batch, row: int, tokens: torch.Tensor | None, steps: torch.Tensor | None, text: str | None
    ) -> dict[str, Any]:
        """The top words and series steps by |attribution|, each score a signed share of the row's total;
        words with their character span in `text` where the tokenizer gives one (infer/explain.py)."""
        result: dict[str, Any] = {"method": "input_x_gradient"}
        if tokens is not None:
            assert batch.input_ids is not None and batch.attention_mask is not None  # tokens attribute them
            ids = batch.input_ids[row].tolist()
            keep = [i for i, token in enumerate(ids) if token not in self._special and batch.attention_mask[row, i]]
            # a list of ids gives a list of tokens (transformers types the result as str | list[str])
            pieces = cast(list[str], self.tokenizer.convert_ids_to_tokens([ids[i] for i in keep]))
            real = ids[: int(batch.attention_mask[row].sum())]
            spans = token_offsets(self.tokenizer, text, real, self.model.config.max_length) if text else None
            scores = tokens[row].detach().float().cpu()[keep].tolist() if keep else []
            words = merge_words(text, keep, pieces, scores, spans)
            result["tokens"] = [word.to_dict() for word in top_words(words, self.top_k)]  # words, infer/explain.py
        if steps is not None:
            assert batch.series_mask is not None  # steps attribute the series it masks
            real = batch.series_mask[row].nonzero().flatten().tolist()
            result["series_steps"] = [{"step": i, "score": s} for (i, s), _ in self._top(steps[row], real, real)]
        return result

    def _features(self, static: torch.Tensor | None, row: int) -> dict[str, Any]:
        """The top static features by |attribution| (infer/explain_features.py); {} without features."""
        if static is None or self.model.features is None:
            return {}
        return {"features": top_features(static[row], self.model.features.names, self.top_k)}

    def _top(
        self, scores: torch.Tensor, positions: list[int], labels: list[Any]
    ) -> list[tuple[tuple[int, float], Any]]:
        values = scores.detach().float().cpu()[positions] if positions else torch.zeros(0)
        total = float(values.abs().sum()) or 1.0
        order = values.abs().argsort(descending=True)[: self.top_k].tolist()
        return [((positions[j], float(values[j]) / total), labels[j]) for j in order]
