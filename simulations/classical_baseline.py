"""Does the hybrid model earn its cost? Classical models on the same static features and the same split.

For a data set with static features (`features:` in the data config), `baseline=true` also fits
scikit-learn's LogisticRegression (numeric features standardised, categorical ones one-hot) and
HistGradientBoostingClassifier (categorical features native) on the pooled training rows of all
banks and on each bank alone, and scores them on the federation's global test set with the
federation's metrics: accuracy, macro-F1, log loss, and ROC-AUC for binary tasks. Both are
deterministic. A category unseen in training is ignored (one-hot) or treated as missing (boosting).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from fingpt_federated.data.records import BankDataset

LOGISTIC = "logistic regression"
BOOSTING = "gradient boosting"
POOLED = "all banks"


def feature_matrix(data: BankDataset) -> np.ndarray:
    """numeric then categorical columns; the category hashes stay exact Python ints (an object array)."""
    if data.features is None:
        raise ValueError("the classical baseline needs static features (features: in the data config)")
    numbers = data.features.numeric.astype(np.float64).astype(object)
    return np.concatenate([numbers, data.features.categorical.astype(object)], axis=1)


def logistic(num_numeric: int, num_categorical: int) -> Pipeline:
    numeric = list(range(num_numeric))
    categorical = list(range(num_numeric, num_numeric + num_categorical))
    columns = ColumnTransformer(
        [("numeric", StandardScaler(), numeric), ("categorical", OneHotEncoder(handle_unknown="ignore"), categorical)]
    )
    return Pipeline([("columns", columns), ("model", LogisticRegression(max_iter=2000))])


def boosting(num_numeric: int, num_categorical: int, seed: int) -> Pipeline:
    numeric = list(range(num_numeric))
    categorical = list(range(num_numeric, num_numeric + num_categorical))
    ordinal = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan)
    columns = ColumnTransformer([("numeric", "passthrough", numeric), ("categorical", ordinal, categorical)])
    native = [False] * num_numeric + [True] * num_categorical
    model = HistGradientBoostingClassifier(categorical_features=native, random_state=seed)
    return Pipeline([("columns", columns), ("model", model)])


def scores(model: Pipeline, test: BankDataset) -> dict[str, float]:
    """The federation's test metrics for a fitted classifier (a class it never saw has probability 0)."""
    probabilities = np.zeros((len(test), test.num_classes))
    probabilities[:, model.classes_] = model.predict_proba(feature_matrix(test))
    predicted = probabilities.argmax(axis=1)
    labels = list(range(test.num_classes))
    metrics = {
        "loss": float(log_loss(test.labels, np.clip(probabilities, 1e-7, 1.0), labels=labels)),
        "accuracy": float(accuracy_score(test.labels, predicted)),
        "macro_f1": float(f1_score(test.labels, predicted, labels=labels, average="macro", zero_division=0)),
    }
    if test.num_classes == 2:
        both = len(np.unique(test.labels)) == 2
        metrics["roc_auc"] = float(roc_auc_score(test.labels, probabilities[:, 1])) if both else math.nan
    return metrics


def classical_results(
    banks: list[tuple[str, BankDataset]], pool: BankDataset, test: BankDataset, seed: int = 0
) -> list[tuple[str, str, int, float, dict[str, float]]]:
    """(model, trained on, train rows, seconds, test metrics) for both models, pooled then each bank alone.

    A bank whose rows hold a single class cannot fit a classifier: it is skipped (its row says nothing).
    """
    assert pool.features is not None and test.features is not None
    sizes = (len(pool.features.numeric_names), len(pool.features.categorical_names))
    makers: dict[str, Callable[[], Pipeline]] = {
        LOGISTIC: lambda: logistic(*sizes),
        BOOSTING: lambda: boosting(*sizes, seed),
    }
    results = []
    for name, maker in makers.items():
        for bank, train in [(POOLED, pool), *banks]:
            if len(np.unique(train.labels)) < 2:
                continue
            start = time.perf_counter()
            model = maker().fit(feature_matrix(train), train.labels)
            results.append((name, bank, len(train), time.perf_counter() - start, scores(model, test)))
    return results


def classical_section(baselines: Sequence[Any], federated: Mapping[str, float] | None) -> list[str]:
    """report.md's answer to "does the hybrid model earn its cost?": every model's test metrics side by side,
    ROC-AUC first for a binary task, and one line comparing the federated model with the pooled logistic
    regression. `baselines`: BaselineResults; `federated`: the global model's final test metrics."""
    classical = [b for b in baselines if b.kind in (LOGISTIC, BOOSTING)]
    if not classical:
        return []
    metric = "roc_auc" if "roc_auc" in classical[0].test else "macro_f1"
    hybrid = [("hybrid, federated", "-", federated or {})]
    hybrid += [(f"hybrid, {b.kind}", b.bank, b.test) for b in baselines if b.kind == "centralized"]
    rows = [[name, bank, *_cells(test, metric)] for name, bank, test in hybrid]
    rows += [[b.kind, b.bank, *_cells(b.test, metric)] for b in classical]
    header = ["model", "trained on", f"test {metric}", "test accuracy", "test macro-F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [
        "## Classical baseline (same static features, same split)",
        "\n".join(lines),
        _verdict(classical, federated, metric),
    ]


def _cells(test: Mapping[str, float], metric: str) -> list[str]:
    return [f"{test.get(name, math.nan):.4f}" for name in (metric, "accuracy", "macro_f1")]


def _verdict(classical: Sequence[Any], federated: Mapping[str, float] | None, metric: str) -> str:
    pooled_lr = next((b.test[metric] for b in classical if b.kind == LOGISTIC and b.bank == POOLED), math.nan)
    ours = math.nan if federated is None else federated.get(metric, math.nan)
    if math.isnan(ours) or math.isnan(pooled_lr):
        return f"No comparison: the federated model's or the pooled logistic regression's {metric} is missing."
    verdict = "matches or beats" if ours >= pooled_lr else "trails"
    return (
        f"The federated hybrid model ({metric} {ours:.4f}) {verdict} the pooled logistic regression "
        f"({pooled_lr:.4f}; difference {ours - pooled_lr:+.4f})."
    )
