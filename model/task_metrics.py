"""The task metrics every evaluation reports, and how a bank's ROC-AUC travels so the federation's is sound.

`model/evaluation.py` measures loss, accuracy, macro-F1 and ROC-AUC (binary: of the positive class;
more classes: one-vs-rest macro over the classes that have both positive and negative rows). ROC-AUC
is undefined on a split holding one class only (NaN locally). A NaN in an evaluate reply would make
the bank's reply fail the finite check (server/replies.py), and Flower averages a key over all
replies, so a bank leaving it out would pull the federation's value towards 0. So a reply carries
`roc_auc` (0 when undefined) with `roc_auc_share` (1 when defined, 0 when not): Flower's
example-weighted mean turns the share into the fraction of validation rows whose bank had an AUC,
and `resolve_shares` divides it back out. The federation's validation ROC-AUC is therefore the
example-weighted mean of the per-bank AUCs over the banks where it is defined: NOT the AUC of the
pooled scores (the operator never sees a bank's scores). The operator's test set AUC is pooled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

ROC_AUC = "roc_auc"
AUC_SHARE = "roc_auc_share"
TASK_METRICS = ("loss", "accuracy", "macro_f1", ROC_AUC)
LOWER_IS_BETTER = frozenset({"loss"})


def for_reply(metrics: Mapping[str, float]) -> dict[str, float]:
    """`metrics` as an evaluate reply carries them: ROC-AUC with its share, never NaN for an undefined AUC."""
    out = dict(metrics)
    if ROC_AUC in out:
        defined = math.isfinite(out[ROC_AUC])
        out[ROC_AUC] = out[ROC_AUC] if defined else 0.0
        out[AUC_SHARE] = 1.0 if defined else 0.0
    return out


def resolve_shares(metrics: Mapping[str, float]) -> dict[str, float]:
    """A bank's or the federation's recorded metrics: ROC-AUC divided by its share, dropped where the share is 0.

    A share outside [0, 1] (a reply that is not from this code) drops ROC-AUC rather than report a made-up value.
    """
    out = dict(metrics)
    if AUC_SHARE not in out:
        return out
    share = out[AUC_SHARE]
    auc = out.pop(ROC_AUC, math.nan)
    if 0.0 < share <= 1.0 and math.isfinite(auc):
        out[ROC_AUC] = auc / share
    return out


def mode_of(metric: str) -> str:
    """`min` for a loss, `max` for the others."""
    return "min" if metric in LOWER_IS_BETTER else "max"
