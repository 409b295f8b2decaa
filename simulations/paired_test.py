"""Is one model worse than another on the same rows beyond what chance gives? The exact McNemar test.

Two models scored on one bank's own test split disagree on some rows: `lost` rows the first gets wrong
and the second right, `won` rows the other way round. If the two were equally good, each disagreement
would go either way with probability 1/2, so `lost` ~ Binomial(lost + won, 1/2). The one-sided p-value
P(X >= lost) says how often chance alone makes the first model lose at least that many of the
disagreements (McNemar 1947, exact form). Rows both get right or both get wrong say nothing about which
is better and do not enter. On a bank of 9 test rows one row lost is p = 0.5: a coin, which is why the
per-bank verdict "better off than alone" is read with this beside it (simulations/personalization.py).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

SIGNIFICANCE = 0.05


def p_worse(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray) -> float:
    """One-sided exact McNemar p-value that `ours` (predicted classes) is worse than `theirs` on `labels`:
    1.0 when they never disagree or `ours` wins every disagreement."""
    ours, theirs, labels = (np.asarray(a) for a in (ours, theirs, labels))
    if not ours.shape == theirs.shape == labels.shape:
        raise ValueError(f"predictions and labels differ in length: {ours.shape}, {theirs.shape}, {labels.shape}")
    ours_right, theirs_right = ours == labels, theirs == labels
    lost = int((theirs_right & ~ours_right).sum())
    won = int((ours_right & ~theirs_right).sum())
    if lost + won == 0:
        return 1.0
    return float(binomtest(lost, lost + won, 0.5, alternative="greater").pvalue)
