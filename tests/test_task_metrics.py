"""Task metrics per round: ROC-AUC that survives a one-class bank and Flower's averaging, in the report and plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from federation_helpers import config
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fingpt_federated.model.evaluation import roc_auc
from fingpt_federated.model.task_metrics import AUC_SHARE, for_reply
from fingpt_federated.server.best_round import RoundSelection
from fingpt_federated.server.history import CENTRAL, FEDERATION, History
from fingpt_federated.server.replies import unusable_metrics
from fingpt_federated.simulations.report import TASK_PLOT, markdown, plot_task_metrics, task_metric_rows
from fingpt_federated.simulations.sim import published_line


def test_roc_auc_binary_one_vs_rest_and_undefined():
    labels = np.array([0, 0, 1, 1])
    binary = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert roc_auc(labels, binary) == pytest.approx(0.75)
    three = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.7, 0.1]])
    # class 2 has no positive row: the macro is over classes 0 and 1 (both perfectly ranked)
    assert roc_auc(np.array([0, 1, 0, 1]), three) == pytest.approx(1.0)
    assert math.isnan(roc_auc(np.array([1, 1]), binary[:2]))


def reply(examples: int, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": examples, **for_reply(metrics)})})


def test_a_one_class_bank_is_not_a_failure_and_the_federation_auc_is_the_mean_over_defined_banks():
    one_class = {"loss": 0.3, "accuracy": 1.0, "roc_auc": math.nan}
    assert unusable_metrics(for_reply(one_class)) == ""  # the NaN AUC used to fail the bank's reply
    assert unusable_metrics(one_class) != ""
    replies = [reply(100, {"roc_auc": 0.9}), reply(300, {"roc_auc": 0.7}), reply(600, one_class)]
    aggregated = aggregate_metricrecords(replies, "num-examples")  # what Flower's FedAvg computes
    assert aggregated["roc_auc"] == pytest.approx((100 * 0.9 + 300 * 0.7) / 1000)  # pulled towards 0 by the share
    history = History()
    history.add(1, "evaluate", FEDERATION, dict(aggregated))
    history.add(1, "evaluate", "bank_c", dict(for_reply(one_class)))
    assert history.rows[0].metrics["roc_auc"] == pytest.approx((100 * 0.9 + 300 * 0.7) / 400)
    assert history.rows[0].metrics[AUC_SHARE] == pytest.approx(0.4)
    assert "roc_auc" not in history.rows[1].metrics


def run_history() -> History:
    history = History()
    history.add(0, "central", CENTRAL, {"accuracy": 0.3, "macro_f1": 0.2, "roc_auc": 0.5, "loss": 1.1})
    for number, (f1, auc) in enumerate([(0.5, 0.7), (0.8, 0.9), (0.6, 0.85)], start=1):
        history.add(number, "central", CENTRAL, {"accuracy": f1, "macro_f1": f1, "roc_auc": auc, "loss": 1 - f1})
        history.add(number, "evaluate", FEDERATION, {"accuracy": f1, "macro_f1": f1 - 0.1, "loss": 1 - f1})
    return history


def test_report_shows_task_metrics_per_round_and_the_published_round(tmp_path):
    history = run_history()
    choice = RoundSelection("best", "macro_f1", "max").choose(history)
    rows = task_metric_rows(history)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and rows[2]["test_roc_auc"] == 0.9
    assert math.isnan(rows[0]["valid_macro_f1"])
    text = markdown("run", {}, history, [], choice=choice)
    assert "## Task metrics per round" in text and "| **2** | 0.8000 | 0.8000 | 0.9000 | 0.8000 | 0.7000 | - |" in text
    assert "published: round 2 of 3 (publish.select=best, validation macro_f1 0.7000" in text
    assert "not a pooled AUC" in text
    assert plot_task_metrics(history, choice, tmp_path / TASK_PLOT).stat().st_size > 10_000


@pytest.mark.parametrize(
    ("overrides", "printed"),
    [((), True), (("publish.enabled=false",), False), (("privacy=he",), False)],
    ids=["publishing", "publishing-off", "under-he"],
)
def test_the_console_names_a_published_round_only_when_the_run_published(overrides, printed):
    choice = RoundSelection("best", "macro_f1", "max").choose(run_history())
    line = published_line(config(*overrides), choice)
    assert line == (choice.line() if printed else "")
