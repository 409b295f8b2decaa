"""Membership inference scores and their statistics (AUC, TPR at a fixed FPR, the ROC curve).

The score is loss-based with difficulty calibration (Yeom et al. 2018; Watson et al. 2022), the offline
end of LiRA (Carlini et al. 2022) with one reference model and no shadow training: a record's score is its
cross-entropy under the federation's initial model (round 0's global state, which every bank and the
operator hold) minus its cross-entropy under the attacked model. A member (a canary the model trained on)
should drop more than its never-inserted twin; subtracting the reference loss removes how hard each random
text happens to be for the untrained model, which without it dominates the raw loss of a small model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fingpt_federated.simulations.attacks.scoring import Scorer


def calibrated_scores(scorer: Scorer, state: Mapping[str, Any], texts: list[str], labels: np.ndarray) -> np.ndarray:
    """Loss under the initial model minus loss under `state`: higher means more likely a member."""
    return scorer.losses(scorer.initial, texts, labels) - scorer.losses(state, texts, labels)


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
