"""Membership inference scores and their statistics (AUC, TPR at a fixed FPR, the ROC curve).

The score is offline LiRA (Carlini et al. 2022, "Membership Inference Attacks From First Principles",
the variant without IN models) with a population null instead of shadow models:

1. the statistic is the logit-scaled confidence of the record's label, phi = log(p_y / (1 - p_y)),
   which LiRA models as Gaussian;
2. difficulty calibration (Watson et al. 2022): phi under the attacked model minus phi under a reference
   model that never saw the canaries, the federation's initial state (round 0's global, which every bank
   and the operator hold). It removes how easy each random text happens to be for the untrained model;
3. the null (OUT) distribution: the same gain on a population of texts drawn as the canaries are but
   never inserted (canaries.population), per class: the gain of class c on every population text gives
   its mean and spread. The score is the gain's z-score against its label's null, monotone in offline
   LiRA's one-sided likelihood ratio. Without this step a canary's gain is dominated by how far training
   moved the class bias of random text (every record labelled the class the model now favours gains,
   member or not), which drowns memorisation in a 3-class model.

The population texts are known non-members, independent of which canaries were inserted (a seeded coin),
so the epsilon lower bound computed from these scores stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fingpt_federated.simulations.attacks.scoring import Scorer


def lira_scores(
    scorer: Scorer,
    state: Mapping[str, Any],
    reference: Mapping[str, Any],
    texts: list[str],
    labels: np.ndarray,
    population: list[str],
) -> np.ndarray:
    """Offline LiRA z-scores of (texts, labels) against `state` (see the module docstring): higher means
    more likely a member; `reference` never saw them, nor `population`."""
    labels = np.asarray(labels, dtype=np.int64)
    gains = scorer.confidences(state, texts) - scorer.confidences(reference, texts)
    null = scorer.confidences(state, population) - scorer.confidences(reference, population)
    return standardised(gains[np.arange(len(labels)), labels], null, labels)


def standardised(gains: np.ndarray, null: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each gain as a z-score against the null gains of its label (`null`: population rows, class columns)."""
    mean, spread = null.mean(axis=0), null.std(axis=0, ddof=1)
    return (np.asarray(gains, float) - mean[labels]) / np.maximum(spread[labels], 1e-12)


def roc_curve(members: np.ndarray, non_members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold `score >= t`, from (0, 0) to (1, 1); ties move both rates together."""
    scores = np.concatenate([members, non_members])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]
    tp = np.cumsum(truth)[last_of_tie]
    fp = np.cumsum(1 - truth)[last_of_tie]
    tpr = np.r_[0.0, tp / max(len(members), 1)]
    fpr = np.r_[0.0, fp / max(len(non_members), 1)]
    return fpr, tpr


def auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score) + half the ties: the area under the ROC curve."""
    m, n = np.asarray(members, float)[:, None], np.asarray(non_members, float)[None, :]
    return float(((m > n).sum() + 0.5 * (m == n).sum()) / (m.size * n.size))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, max_fpr: float = 0.01) -> float:
    """The largest TPR over thresholds whose FPR is at most `max_fpr` (0 when none is, e.g. too few
    non-members for 1%: with 50 twins the only such threshold flags no twin at all)."""
    fpr, tpr = roc_curve(np.asarray(members, float), np.asarray(non_members, float))
    return float(tpr[fpr <= max_fpr + 1e-12].max())
