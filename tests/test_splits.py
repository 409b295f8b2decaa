"""Deterministic train/validation/test splits of a bank's rows."""

from __future__ import annotations

import numpy as np
import pytest

from fingpt_federated.data.splits import split_train_valid, time_split_indices

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.sort(rng.choice(NUM_CLASSES, size=2000, p=[0.4, 0.25, 0.15, 0.12, 0.08]))


def test_train_valid_split_is_disjoint_stratified_and_seeded(labels):
    bank = np.sort(np.random.default_rng(3).choice(len(labels), 500, replace=False))
    train, valid = split_train_valid(bank, labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.r_[train, valid]), bank)
    assert np.intersect1d(train, valid).size == 0
    assert valid.size == round(0.2 * bank.size)
    expected = 0.2 * np.bincount(labels[bank], minlength=NUM_CLASSES)
    assert np.all(np.abs(np.bincount(labels[valid], minlength=NUM_CLASSES) - expected) <= 1)
    again = split_train_valid(bank, labels, 0.2, seed=1)
    assert np.array_equal(again[1], valid)
    assert not np.array_equal(split_train_valid(bank, labels, 0.2, seed=2)[1], valid)


def test_train_valid_split_keeps_every_class_in_train_for_tiny_classes():
    tiny = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    train, valid = split_train_valid(np.arange(8), tiny, 0.5, seed=0)
    assert valid.size == 4
    assert set(tiny[train]) == {0, 1, 2}
    pairs = np.array([0, 0, 1, 1, 2, 2])
    train, valid = split_train_valid(np.arange(6), pairs, 0.6, seed=0)
    assert set(pairs[train]) == {0, 1, 2}
    assert valid.size == 3


def test_train_valid_split_falls_back_to_random_and_keeps_a_train_row():
    singleton_class = np.array([0, 0, 0, 1])
    train, valid = split_train_valid(np.arange(4), singleton_class, 0.5, seed=0)
    assert (train.size, valid.size) == (2, 2)
    train, valid = split_train_valid(np.array([5]), np.zeros(6, dtype=int), 0.9, seed=0)
    assert train.tolist() == [5] and valid.size == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_train_valid_split_rejects_fractions_outside_zero_one(labels, fraction):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_train_valid(np.arange(10), labels, fraction, seed=0)


def test_time_split_holds_out_the_latest_rows():
    times = np.array(["2017-01-03", "2013-02-08", "2016-05-01", "2018-01-02", "2014-07-07"])
    earlier, latest = time_split_indices(times, 0.4)
    assert latest.tolist() == [0, 3]
    assert earlier.tolist() == [1, 2, 4]
    assert max(times[earlier]) < min(times[latest])
