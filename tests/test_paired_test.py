"""The exact McNemar test behind "worse off than alone beyond chance" (simulations/paired_test.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fingpt_federated.simulations.paired_test import p_worse


def test_only_the_disagreements_count_and_one_row_of_few_is_a_coin():
    labels = np.zeros(19, dtype=int)
    alone = labels.copy()
    ours = labels.copy()
    ours[0] = 1  # one row of 19 lost, none won: chance gives this half the time
    assert p_worse(ours, alone, labels) == pytest.approx(0.5)
    both_wrong = ours.copy(), alone.copy()
    both_wrong[0][5] = both_wrong[1][5] = 1  # a row both get wrong says nothing
    assert p_worse(*both_wrong, labels) == pytest.approx(0.5)
    assert p_worse(alone, ours, labels) == pytest.approx(1.0)  # the other way round: never worse
    assert p_worse(alone, alone, labels) == 1.0  # no disagreement


def test_a_real_shortfall_is_significant_and_its_p_is_the_binomial_tail():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    theirs = labels.copy()
    ours = labels.copy()
    lost = rng.choice(400, 30, replace=False)
    ours[lost] = (labels[lost] + 1) % 3  # 30 rows lost
    won = np.setdiff1d(np.arange(400), lost)[:10]
    theirs[won] = (labels[won] + 1) % 3  # 10 rows won
    # P(X >= 30), X ~ Binomial(40, 1/2)
    from math import comb

    expected = sum(comb(40, k) for k in range(30, 41)) / 2**40
    assert p_worse(ours, theirs, labels) == pytest.approx(expected)
    assert p_worse(ours, theirs, labels) < 0.01
    assert p_worse(theirs, ours, labels) > 0.99


def test_predictions_of_another_split_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        p_worse(np.zeros(5), np.zeros(4), np.zeros(5))
