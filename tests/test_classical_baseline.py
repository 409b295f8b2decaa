"""The classical baseline: logistic regression and gradient boosting on the static features, pooled and per bank."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fingpt_federated.data.loading import table_to_dataset
from fingpt_federated.simulations.baselines import BaselineResult, pooled
from fingpt_federated.simulations.classical_baseline import (
    BOOSTING,
    LOGISTIC,
    POOLED,
    classical_results,
    classical_section,
)

CFG = {
    "label": {"column": "default", "classes": {0: "repaid", 1: "default"}},
    "features": {"numeric": ["amount", "noise"], "categorical": ["purpose"]},
}


def bank(n: int, seed: int, purposes: tuple[str, ...] = ("car", "business")):
    rng = np.random.default_rng(seed)
    amount = rng.normal(0, 1, n)
    purpose = rng.choice(list(purposes), n)
    default = (amount + np.where(purpose == "business", 1.0, -1.0) + rng.normal(0, 0.3, n) > 0).astype(int)
    table = pd.DataFrame({"amount": amount, "noise": rng.normal(0, 1, n), "purpose": purpose, "default": default})
    return table_to_dataset(table.assign(_source="t.csv", _row=np.arange(1, n + 1)), CFG)


def test_both_models_pooled_and_per_bank_with_an_unseen_category_in_test() -> None:
    banks = [("a", bank(200, 0)), ("b", bank(150, 1))]
    test = bank(300, 2, ("car", "business", "wedding"))  # "wedding" never seen in training
    results = classical_results(banks, pooled([data for _, data in banks]), test)
    assert [(model, where) for model, where, *_ in results] == [
        (model, where) for model in (LOGISTIC, BOOSTING) for where in (POOLED, "a", "b")
    ]
    pooled_lr = results[0]
    assert pooled_lr[2] == 350 and pooled_lr[4]["roc_auc"] > 0.9, pooled_lr
    assert all(set(r[4]) == {"loss", "accuracy", "macro_f1", "roc_auc"} for r in results)


def test_a_single_class_bank_is_skipped() -> None:
    one_class = bank(100, 3)
    one_class = one_class.subset(np.flatnonzero(one_class.labels == 0))
    results = classical_results([("only_repaid", one_class)], bank(200, 4), bank(100, 5))
    assert {where for _, where, *_ in results} == {POOLED}


def test_report_section_says_whether_the_federated_model_matches_the_pooled_logistic_regression() -> None:
    metrics = {"roc_auc": 0.78, "accuracy": 0.8, "macro_f1": 0.7, "loss": 0.5}
    baselines = [
        BaselineResult("centralized", "all banks", 100, 500, 1.0, {**metrics, "roc_auc": 0.76}),
        BaselineResult(LOGISTIC, POOLED, 0, 500, 0.1, {**metrics, "roc_auc": 0.77}),
    ]
    title, table, verdict = classical_section(baselines, {**metrics, "roc_auc": 0.75})
    assert "| hybrid, federated | - | 0.7500 |" in table and "| logistic regression | all banks | 0.7700 |" in table
    assert verdict.startswith("The federated hybrid model (roc_auc 0.7500) trails the pooled logistic regression")
    assert "-0.0200" in verdict
    assert "matches or beats" in classical_section(baselines, {**metrics, "roc_auc": 0.8})[2]
    assert classical_section(baselines[:1], metrics) == []
