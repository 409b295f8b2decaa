"""Privacy accounting of DP-SGD: what a history of noisy steps costs, and how much noise a budget allows.

A history is Opacus's: a list of (noise_multiplier, sample_rate, steps) of Poisson-subsampled
Gaussian steps, consecutive equal mechanisms merged. All the mathematics is Opacus's own
accountants (PRV by default: tighter than RDP, e.g. q=0.01, sigma=1, 1000 steps, delta=1e-5
gives 1.84 against RDP's 2.10); this module only fixes the conventions the rest of the
project relies on, so that a ledger, a calibration and a live PrivacyEngine agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

CALIBRATION_TOLERANCE = 0.01
"""Calibrated noise spends between target - this and target epsilon after the planned steps."""
_MAX_NOISE = 1e6
"""Opacus's own bound on the noise a calibration may return."""


@dataclass(frozen=True)
class Spend:
    """`steps` DP-SGD steps with noise `noise_multiplier` on Poisson batches of rate `sample_rate`."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def as_tuple(self) -> tuple[float, float, int]:
        return (float(self.noise_multiplier), float(self.sample_rate), int(self.steps))


def compose(history: Sequence[Spend], spend: Spend) -> tuple[Spend, ...]:
    """`history` followed by `spend`, merged into the last entry when the mechanism is the same.

    This is how Opacus's accountants grow their history step by step, so a ledger extended
    with a round's spend equals the history of the PrivacyEngine that ran the round.
    """
    if spend.steps == 0:
        return tuple(history)
    if history and (history[-1].noise_multiplier, history[-1].sample_rate) == (
        spend.noise_multiplier,
        spend.sample_rate,
    ):
        last = history[-1]
        return (*history[:-1], Spend(last.noise_multiplier, last.sample_rate, last.steps + spend.steps))
    return (*history, spend)


def accountant_with(mechanism: str, history: Iterable[Spend]) -> IAccountant:
    """A fresh Opacus accountant (`prv`, `rdp`) holding `history`."""
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = [spend.as_tuple() for spend in history if spend.steps > 0]
    return accountant


def history_of(accountant: IAccountant) -> tuple[Spend, ...]:
    """An Opacus accountant's history as Spends."""
    return tuple(Spend(float(sigma), float(rate), int(steps)) for sigma, rate, steps in accountant.history)


def epsilon(history: Sequence[Spend], delta: float, mechanism: str) -> float:
    """Epsilon spent by `history` at `delta` (0 for no steps); PRV returns its upper bound.

    Memoised: a round asks for the same history twice (its projection, then what it spent),
    and one epsilon costs 0.05-1 s of CPU.
    """
    if not any(spend.steps for spend in history):
        return 0.0
    return _epsilon(tuple(spend for spend in history if spend.steps > 0), float(delta), mechanism)


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[Spend, ...], delta: float, mechanism: str) -> float:
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf for a release of all records (q = 1)
        return float(accountant_with(mechanism, history).get_epsilon(delta=delta))


def sample_rate_for(num_examples: int, logical_batch_size: int) -> float:
    """The Poisson rate Opacus uses for a loader of `logical_batch_size` over `num_examples` records.

    `PrivacyEngine.make_private` takes 1 / len(data_loader), i.e. 1 / ceil(n / B), not B / n;
    calibrating with B / n would make the ledger and the engine disagree.
    """
    if num_examples < 1 or logical_batch_size < 1:
        raise ValueError(f"need at least one record and batch size >= 1, got {num_examples} and {logical_batch_size}")
    return 1.0 / math.ceil(num_examples / logical_batch_size)


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mechanism: str,
    spent: Sequence[Spend] = (),
) -> float:
    """The smallest noise multiplier (to CALIBRATION_TOLERANCE) whose `steps` fit target_epsilon.

    The steps come after `spent`, what the budget already paid for (e.g. a released label
    histogram), and are calibrated for what it leaves. Raises ValueError when no noise level
    reaches the target (Opacus's limit, sigma 1e6).
    """
    if steps < 1:
        raise ValueError(f"calibrating needs at least one planned step, got {steps}")
    spent = tuple(spend for spend in spent if spend.steps > 0)
    if not spent:
        return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), mechanism)
    return _calibrate_after(spent, float(target_epsilon), float(delta), float(sample_rate), int(steps), mechanism)


@lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str) -> float:
    """Memoised: banks of one simulation process often share a plan, and one search costs seconds."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=mechanism,
            epsilon_tolerance=CALIBRATION_TOLERANCE,
        )
    )


@lru_cache(maxsize=256)
def _calibrate_after(
    spent: tuple[Spend, ...], target_epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: str
) -> float:
    """Opacus's search (get_noise_multiplier: double, then bisect) over the composition `spent` + steps."""

    def cost(sigma: float) -> float:
        return epsilon(compose(spent, Spend(sigma, sample_rate, steps)), delta, mechanism)

    if epsilon(spent, delta, mechanism) >= target_epsilon:
        raise ValueError(f"epsilon {epsilon(spent, delta, mechanism):.4f} is spent already, target {target_epsilon}")
    low, high = 0.0, 10.0
    cost_high = cost(high)
    while cost_high > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_NOISE:
            raise ValueError(f"no noise multiplier up to {_MAX_NOISE:g} reaches epsilon {target_epsilon}")
        cost_high = cost(high)
    while target_epsilon - cost_high > CALIBRATION_TOLERANCE:
        sigma = (low + high) / 2
        spend = cost(sigma)
        if spend < target_epsilon:
            high, cost_high = sigma, spend
        else:
            low = sigma
    return high


def extension(old: Sequence[Spend], new: Sequence[Spend]) -> tuple[Spend, ...]:
    """The spends that turn history `old` into history `new` (so `new` == `old` composed with them).

    Raises ValueError when `new` does not extend `old`: an accountant that was not restored from
    `old`, or one whose history was rewritten.
    """
    old, new = tuple(old), tuple(new)
    if not old:
        return new
    k = len(old)
    last_old = old[-1]
    last_new = new[k - 1] if len(new) >= k else None
    if (
        last_new is None
        or new[: k - 1] != old[:-1]
        or (last_new.noise_multiplier, last_new.sample_rate) != (last_old.noise_multiplier, last_old.sample_rate)
        or last_new.steps < last_old.steps
    ):
        raise ValueError(f"history {list(new)} does not extend {list(old)}")
    grown = last_new.steps - last_old.steps
    head = (Spend(last_old.noise_multiplier, last_old.sample_rate, grown),) if grown else ()
    return head + new[k:]
