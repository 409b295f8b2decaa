"""An empirical lower bound on epsilon from canary scores (Jagielski, Ullman, Oprea 2020).

An (epsilon, delta)-DP training run bounds every membership test: FPR + e^eps * FNR >= 1 - delta and
FNR + e^eps * FPR >= 1 - delta. A threshold on the canaries' scores gives an observed FPR (twins flagged)
and FNR (canaries missed); their Clopper-Pearson upper bounds, each at 1 - alpha/2 (two bounds, together
at confidence 1 - alpha), turn the inequalities into

    eps_lower = max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi)).

The threshold is the one that gives the largest bound; choosing it on the same scores is what Jagielski
et al. do, and it can only make the bound optimistic by the multiplicity of thresholds, so the confidence
is stated for the chosen one. A bound above the epsilon the ledger spent means the DP path leaks more than
it accounts for: a bug to find, never a figure to report as is.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta


def clopper_pearson_upper(failures: int, trials: int, alpha: float) -> float:
    """One-sided upper confidence bound, at 1 - alpha, on a binomial rate from `failures` of `trials`."""
    if trials <= 0:
        return 1.0
    if failures >= trials:
        return 1.0
    return float(beta.ppf(1 - alpha, failures + 1, trials - failures))


def epsilon_from_rates(fpr_hi: float, fnr_hi: float, delta: float) -> float:
    """The epsilon that upper bounds on FPR and FNR certify (0 when they certify nothing)."""
    bounds = [0.0]
    for first, second in ((fnr_hi, fpr_hi), (fpr_hi, fnr_hi)):
        if second > 0 and 1 - delta - first > 0:
            bounds.append(math.log((1 - delta - first) / second))
    return max(bounds)


def epsilon_lower_bound(members: np.ndarray, non_members: np.ndarray, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon lower bound over thresholds `score >= t`, at `confidence` (Clopper-Pearson)."""
    members, non_members = np.asarray(members, float), np.asarray(non_members, float)
    alpha = (1 - confidence) / 2
    best = 0.0
    for threshold in np.unique(np.concatenate([members, non_members, [np.inf]])):
        false_neg = int((members < threshold).sum())
        false_pos = int((non_members >= threshold).sum())
        fnr_hi = clopper_pearson_upper(false_neg, len(members), alpha)
        fpr_hi = clopper_pearson_upper(false_pos, len(non_members), alpha)
        best = max(best, epsilon_from_rates(fpr_hi, fnr_hi, delta))
    return best
