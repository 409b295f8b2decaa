"""Rounds and seconds to a target accuracy, and the round-to-round swing (simulations/progress.py)."""

from __future__ import annotations

import math

import pytest

from fingpt_federated.simulations.progress import Target, progress, progress_lines, progress_section, targets
from fingpt_federated.simulations.report import RoundRow

# issue 26's 20-round TFNS curve (FedAvg + logit adjustment): rounds 1-20
TFNS_20 = [0.567, 0.631, 0.624, 0.687, 0.753, 0.768, 0.761, 0.762, 0.752, 0.731]
TFNS_20 += [0.758, 0.737, 0.752, 0.776, 0.779, 0.772, 0.776, 0.779, 0.785, 0.781]


def rows(accuracies, seconds=None):
    seconds = seconds or [10.0 * (n + 1) for n in range(len(accuracies))]
    initial = RoundRow(0, 0.432, 1.1, math.nan, math.nan, math.nan, 0, 0, math.nan)
    return [initial] + [
        RoundRow(n + 1, acc, 1.0, acc, 1.0, 1.0, 10, 0, sec)
        for n, (acc, sec) in enumerate(zip(accuracies, seconds, strict=True))
    ]


def test_a_target_is_reached_at_the_first_round_at_or_above_it_with_the_rounds_seconds_summed():
    found = progress(rows(TFNS_20), [Target("0.75", 0.75), Target("0.78", 0.78), Target("0.848", 0.848)])
    assert found is not None
    reach_75, reach_78, reach_848 = found.reached
    assert (reach_75.round, reach_75.seconds) == (5, 10 + 20 + 30 + 40 + 50)
    assert reach_78.round == 19 and reach_78.seconds == pytest.approx(sum(10.0 * n for n in range(1, 20)))
    assert reach_848.round is None and math.isnan(reach_848.seconds)
    assert (found.best_round, found.best_accuracy) == (19, 0.785)


def test_the_swing_is_the_mean_absolute_change_over_the_last_half_and_the_largest_drop_is_found():
    found = progress(rows(TFNS_20), [])
    assert found is not None
    changes = [b - a for a, b in zip(TFNS_20, TFNS_20[1:], strict=False)]  # 19 changes, the last half from the 10th on
    assert found.swing == pytest.approx(sum(abs(c) for c in changes[9:]) / 10)
    assert found.largest_drop == pytest.approx(0.752 - 0.731)  # rounds 9 -> 10
    rising = progress(rows([0.5, 0.6, 0.7, 0.8]), [])
    assert rising is not None and rising.largest_drop == 0.0 and rising.swing == pytest.approx(0.1)


def test_the_initial_model_does_not_count_as_reaching_a_target():
    initial_above = rows([0.3, 0.5])  # round 0 is at 0.432
    found = progress(initial_above, [Target("0.4", 0.4)])
    assert found is not None and found.reached[0].round == 2 and found.reached[0].seconds == 30.0


def test_shares_of_pooled_are_targets_only_when_the_pooled_baseline_was_trained():
    assert [t.label for t in targets([0.8], [0.95, 0.98], math.nan)] == ["0.8"]
    found = targets([0.8], [0.95, 0.98], 0.8)
    assert [t.label for t in found] == ["0.8", "0.95 x pooled (0.7600)", "0.98 x pooled (0.7840)"]
    assert found[2].accuracy == pytest.approx(0.784)


def test_rounds_without_a_test_accuracy_still_count_their_seconds():
    """Under HE only the last round is tested (its state decrypted by a bank): the seconds are the whole run's."""
    found = progress(rows([math.nan, math.nan, 0.7]), [Target("0.65", 0.65)])
    assert found is not None and found.reached[0].round == 3 and found.reached[0].seconds == 60.0
    assert found.best_round == 3 and math.isnan(found.swing) and found.largest_drop == 0.0  # one tested round


def test_a_run_without_test_accuracies_has_no_progress_and_a_round_never_timed_gives_no_seconds():
    assert progress(rows([math.nan, math.nan]), [Target("0.5", 0.5)]) is None
    found = progress(rows([0.6, 0.7], seconds=[math.nan, 5.0]), [Target("0.65", 0.65)])
    assert found is not None and found.reached[0].round == 2 and math.isnan(found.reached[0].seconds)


def test_the_report_and_console_name_each_target_and_never():
    found = progress(rows(TFNS_20), targets([0.848], [0.95], 0.808))
    assert found is not None
    text = "\n".join(progress_section(found))
    assert "| 0.848 | never | - |" in text and "| 0.95 x pooled (0.7676) | 6 | 210.0 |" in text
    assert "largest drop 0.0210" in text
    assert progress_lines(found)[:2] == ["reached 0.848: never", "reached 0.95 x pooled (0.7676): round 6, 210.0 s"]


def test_targets_outside_zero_one_are_refused_by_the_schema():
    from federation_helpers import config

    from fingpt_federated.conf.schema import check_config

    with pytest.raises(ValueError, match=r"simulation.targets must hold accuracies in \(0, 1\], got \[84.8\]"):
        check_config(config("simulation.targets=[84.8]"))
