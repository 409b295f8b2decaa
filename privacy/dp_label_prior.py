"""A bank's label counts released once under the Gaussian mechanism, for the logit-adjusted loss.

The logit-adjusted cross-entropy (client/training.py) shifts the logits by the log of the bank's
label prior. Read from the records, that prior is a statistic of the customers that DP-SGD's
accounting never sees. Here it is released like any other: adding or removing one record changes
one count by one (L2 sensitivity 1), so counts + N(0, sigma^2) per class is the Gaussian
mechanism with noise multiplier sigma, which Opacus accounts as one step at sample rate 1. The
release is charged to the bank's ledger before any DP-SGD step (so the noise of those steps is
calibrated for the budget it leaves) and kept there: later rounds and restarts reuse it.
Clipping at zero and smoothing are post-processing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fingpt_federated.privacy.dp_accounting import Spend
from fingpt_federated.privacy.dp_budget import LedgerError, PrivacyLedger

RELEASE = "label_counts"
"""The name of the release in a ledger."""


def private_label_counts(
    labels: Sequence[int] | np.ndarray,
    num_classes: int,
    ledger: PrivacyLedger,
    noise: float,
    *,
    seed: int | None = None,
) -> np.ndarray:
    """The bank's noisy label counts (>= 0, one per class), released and charged once per ledger.

    Raises BudgetExceeded (recording nothing) when the release does not fit the bank's budget.
    `seed` makes the noise reproducible, for tests only: a known seed lets anyone remove it.
    """
    released = ledger.released.get(RELEASE)
    if released is not None:
        if len(released) != num_classes:
            raise LedgerError(
                f"{ledger.path}: {len(released)} label counts were released, the model has {num_classes} classes"
            )
        return np.asarray(released, dtype=np.float64)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if len(counts) != num_classes:
        raise ValueError(f"labels go up to {len(counts) - 1}, the model has {num_classes} classes")
    rng = np.random.default_rng(seed if seed is not None else int.from_bytes(os.urandom(16), "little"))
    noisy = np.clip(counts + rng.normal(0.0, noise, size=num_classes), 0.0, None)
    ledger.record_release(RELEASE, Spend(noise, 1.0, 1), noisy.tolist())
    return noisy
