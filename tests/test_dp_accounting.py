"""Accounting conventions: published epsilons, Opacus-style merging, sample rates, calibration."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fingpt_federated.privacy.dp_accounting import (
    CALIBRATION_TOLERANCE,
    Spend,
    accountant_with,
    calibrate_noise,
    compose,
    epsilon,
    extension,
    history_of,
    sample_rate_for,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize(("mechanism", "published"), [("rdp", 2.10), ("prv", 1.84)])
def test_epsilon_matches_the_published_figure(mechanism, published):
    # q = 0.01, sigma = 1.0, 1000 steps, delta = 1e-5 (Opacus's own tables; STACK-NOTES).
    assert epsilon([Spend(1.0, 0.01, 1000)], 1e-5, mechanism) == pytest.approx(published, abs=0.005)


def test_no_steps_spend_nothing():
    assert epsilon([], 1e-5, "prv") == 0.0
    assert epsilon([Spend(1.0, 0.01, 0)], 1e-5, "rdp") == 0.0


def test_compose_merges_like_an_opacus_accountant():
    stepped = RDPAccountant()
    for sigma, rate, steps in [(1.0, 0.1, 3), (1.5, 0.1, 2), (1.5, 0.1, 4), (1.0, 0.1, 1)]:
        for _ in range(steps):
            stepped.step(noise_multiplier=sigma, sample_rate=rate)
    history: tuple[Spend, ...] = ()
    for spend in [Spend(1.0, 0.1, 3), Spend(1.5, 0.1, 2), Spend(1.5, 0.1, 4), Spend(1.0, 0.1, 1)]:
        history = compose(history, spend)
    assert history == history_of(stepped)
    assert accountant_with("rdp", history).history == stepped.history


def test_extension_recovers_what_a_round_added_and_rejects_rewritten_histories():
    old = (Spend(1.0, 0.1, 5),)
    assert extension(old, (Spend(1.0, 0.1, 8),)) == (Spend(1.0, 0.1, 3),)
    assert extension(old, (Spend(1.0, 0.1, 5), Spend(2.0, 0.1, 2))) == (Spend(2.0, 0.1, 2),)
    assert extension((), (Spend(1.0, 0.1, 2),)) == (Spend(1.0, 0.1, 2),)
    for rewritten in [(), (Spend(1.0, 0.1, 4),), (Spend(1.1, 0.1, 6),)]:
        with pytest.raises(ValueError, match="does not extend"):
            extension(old, rewritten)


def test_sample_rate_is_the_one_opacus_derives_from_the_loader_length():
    assert sample_rate_for(1000, 256) == 1 / 4  # not 256 / 1000
    assert sample_rate_for(100, 256) == 1.0
    with pytest.raises(ValueError):
        sample_rate_for(0, 256)


@pytest.mark.parametrize(("mechanism", "target"), [("rdp", 1.0), ("rdp", 8.0), ("prv", 3.0)])
def test_calibrated_noise_spends_at_most_the_target_and_close_to_it(mechanism, target):
    rate, steps = 0.05, 200
    sigma = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=rate, steps=steps, mechanism=mechanism)
    spent = epsilon([Spend(sigma, rate, steps)], 1e-5, mechanism)
    assert target - 2 * CALIBRATION_TOLERANCE <= spent <= target
    # An independent Opacus accountant agrees.
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    independent.history = [(sigma, rate, steps)]
    assert math.isclose(independent.get_epsilon(delta=1e-5), spent, abs_tol=1e-9)


def test_spend_validates_its_fields():
    for bad in [(0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1)]:
        with pytest.raises(ValueError):
            Spend(*bad)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_calibration_after_a_spend_fits_the_composition_in_the_target(mechanism):
    released = (Spend(4.0, 1.0, 1),)  # a Gaussian release of counts (sensitivity 1, std 4)
    rate, steps, target = 0.05, 200, 3.0
    alone = calibrate_noise(target_epsilon=target, delta=1e-5, sample_rate=rate, steps=steps, mechanism=mechanism)
    after = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=rate, steps=steps, mechanism=mechanism, spent=released
    )
    independent = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    independent.history = [(4.0, 1.0, 1), (after, rate, steps)]
    total = independent.get_epsilon(delta=1e-5)
    assert target - 2 * CALIBRATION_TOLERANCE <= total <= target
    assert after > alone  # the release leaves less budget, so the steps need more noise
    with pytest.raises(ValueError, match="spent already"):
        calibrate_noise(
            target_epsilon=0.1,
            delta=1e-5,
            sample_rate=rate,
            steps=steps,
            mechanism=mechanism,
            spent=(Spend(1.0, 1.0, 1),),
        )
