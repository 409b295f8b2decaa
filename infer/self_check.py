"""The self-check a served model passes before the service binds its port, and what /health says it can do.

A model whose files match its card may still be useless: weights that overflow, a tokenizer that
does not fit, an explanation that fails. The self-check builds one request from the model's own
manifest (a short text if it reads text; a series of its width and full length if it reads one),
predicts it with an explanation and two Monte Carlo dropout passes, and requires finite
probabilities that sum to 1 over the model's classes. It goes through the Predictor, not the
service: nothing is audited or cached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fingpt_federated.infer.inputs import expects_text, records_to_dataset, static_features
from fingpt_federated.infer.predictor import Prediction, Predictor
from fingpt_federated.infer.schemas import Capabilities

SELF_CHECK_TEXT = "The company reported quarterly results in line with expectations."
SUM_TOLERANCE = 1e-4


class SelfCheckError(ValueError):
    """The model failed its self-check prediction: it must not be served."""


def synthetic_record(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A request record that fits the model: text if it reads text, a full-length series of its width."""
    record: dict[str, Any] = {}
    if expects_text(manifest):
        record["text"] = SELF_CHECK_TEXT
    width = int(manifest["num_features"])
    if width:
        steps = int(manifest["model"]["series_encoder"]["max_steps"])
        record["series"] = [[100.0 + step + feature for feature in range(width)] for step in range(steps)]
    numeric, categorical = static_features(manifest)
    if numeric or categorical:  # an unseen category is read as "unknown": a fair test of that path too
        record["features"] = {**{name: 100.0 for name in numeric}, **{name: "self-check" for name in categorical}}
    return record


def run_self_check(predictor: Predictor) -> Capabilities:
    """Predict the synthetic record; a failure or an output that is not a distribution raises SelfCheckError."""
    published = predictor.published
    manifest = published.manifest
    record = synthetic_record(manifest)
    try:
        (prediction,) = predictor.predict(records_to_dataset([record], manifest), explain=True, mc_samples=2)
    except (ValueError, RuntimeError) as error:
        raise SelfCheckError(failed(published.folder, str(error))) from None
    problem = distribution_problem(prediction, published.class_names)
    if problem:
        raise SelfCheckError(failed(published.folder, problem))
    explanation = prediction.explanation or {}
    scores = [item["score"] for key in ("tokens", "series_steps") for item in explanation.get(key, [])]
    if not all(math.isfinite(score) for score in scores):
        raise SelfCheckError(failed(published.folder, f"non-finite explanation scores {scores}"))
    return Capabilities(
        classes=published.class_names,
        text="text" in record,
        series="series" in record,
        num_features=int(manifest["num_features"]),
        max_series_steps=len(record.get("series", [])),
        explain=bool(explanation.get("tokens") or explanation.get("series_steps")),
    )


def failed(folder: Path, reason: str) -> str:
    return f"{folder}: not served, its self-check prediction failed: {reason.removeprefix(f'{folder}: ')}"


def distribution_problem(prediction: Prediction, classes: list[str]) -> str | None:
    """Why a prediction is not a probability distribution over `classes` with a finite uncertainty, or None."""
    probabilities = prediction.probabilities
    if list(probabilities) != classes:
        return f"probabilities over {list(probabilities)}, expected the classes {classes}"
    values = [*probabilities.values(), *prediction.uncertainty.values()]
    if not all(math.isfinite(v) for v in values):
        return f"non-finite output {prediction.output()}"
    if min(probabilities.values()) < 0:
        return f"a negative probability in {probabilities}"
    total = sum(probabilities.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        return f"probabilities sum to {total:.6f}, not 1"
    return None
