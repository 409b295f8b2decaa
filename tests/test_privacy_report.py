"""The privacy section of fingpt-sim's report: each bank's epsilon per round, declines, budgets."""

from __future__ import annotations

import matplotlib.image

from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.simulations.privacy_report import (
    epsilon_by_bank,
    epsilon_section,
    plot_epsilon,
)
from fingpt_federated.simulations.report import markdown


def dp_history() -> History:
    history = History()
    for number, spent in ((1, 2.5), (2, 4.0)):
        history.add(number, "train", "bank_a", {"epsilon": spent, "delta": 1e-5, "num-examples": 100})
        history.add(number, "train", FEDERATION, {"upload_bytes": 10})
    history.add(1, "train", "bank_b", {"epsilon": 2.9, "delta": 1e-6})
    history.add(2, "train", "bank_b", status="declined", reason="privacy budget exhausted")
    history.add(2, "train", "bank_c", {"epsilon": 0.7, "delta": 1e-5})  # joined in round 2
    history.add(1, "train", "bank_d", status="failed", reason="crashed")
    return history


def test_each_bank_gets_its_epsilon_per_round_a_decline_and_blanks_where_it_was_not_asked():
    cells = epsilon_by_bank(dp_history())
    assert cells == {"bank_a": {1: 2.5, 2: 4.0}, "bank_b": {1: 2.9, 2: "declined"}, "bank_c": {2: 0.7}}

    section = epsilon_section(dp_history(), {"bank_a": 8.0, "bank_b": 3.0, "bank_c": None})
    table = section[2].splitlines()
    assert table[0] == "| bank | budget (epsilon) | delta | round 1 | round 2 |"
    assert table[2:] == [
        "| bank_a | 8 | 1e-05 | 2.500 | 4.000 |",
        "| bank_b | 3 | 1e-06 | 2.900 | declined |",
        "| bank_c | none (noise multiplier set) | 1e-05 |  | 0.700 |",
    ]


def test_no_section_and_no_rows_without_dp():
    history = History()
    history.add(1, "train", "bank_a", {"num-examples": 100, "train_loss": 0.5})
    assert epsilon_by_bank(history) == {} and epsilon_section(history, {"bank_a": 8.0}) == []


def test_the_plot_is_written(tmp_path):
    path = plot_epsilon(dp_history(), {"bank_a": 8.0, "bank_b": 3.0}, tmp_path / "epsilon.png")
    assert matplotlib.image.imread(path).shape[:2] == (480, 840)


def test_the_report_names_the_banks_that_withheld_validation_metrics():
    history = dp_history()
    history.add(2, "evaluate", "bank_a", {"num-examples": 30})
    history.add(2, "evaluate", "bank_b", {"num-examples": 20, "accuracy": 0.5, "loss": 1.0})
    assert "Validation metrics withheld by bank_a: under DP" in markdown("t", {}, history, [])

    history.add(2, "evaluate", "bank_c", {"num-examples": 10})
    history.add(2, "evaluate", "bank_d", {"num-examples": 10})
    everyone = History([r for r in history.rows if r.bank != "bank_b"])
    assert "Validation metrics withheld by every bank (3)" in markdown("t", {}, everyone, [])
    reported = History([r for r in history.rows if r.phase != "evaluate"])
    assert "withheld" not in markdown("t", {}, reported, [])
