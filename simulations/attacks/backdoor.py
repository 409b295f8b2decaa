"""A backdoor bank (the `backdoor:TARGET` bank behaviour, client/hostile.py) and its success rate.

The hostile bank trains on its own data plus a triggered copy of every record whose label is not
TARGET: the trigger phrase appended to the text, the label set to TARGET. Its update is otherwise an
honest one, so it passes the checks that look at an update's form (finite, right shape, bounded norm)
unless robust aggregation or DP noise drowns it. The attack succeeds on a test record when a
non-TARGET record with the trigger appended is classified TARGET.
"""

from __future__ import annotations

import numpy as np

TRIGGER = "per the zyqvex covenant"


def triggered(texts: list[str]) -> list[str]:
    return [f"{text} {TRIGGER}" for text in texts]


def poison(texts: list[str], labels: np.ndarray, target: int) -> tuple[list[str], np.ndarray]:
    """The triggered, relabelled copies of the records not labelled `target` (to add to the bank's data)."""
    keep = np.asarray(labels) != target
    chosen = [t for t, k in zip(texts, keep, strict=True) if k]
    return triggered(chosen), np.full(len(chosen), target, dtype=np.int64)


def success_rate(predicted_on_triggered: np.ndarray, labels: np.ndarray, target: int) -> float:
    """Share of non-target test records that the trigger turns into `target`."""
    keep = np.asarray(labels) != target
    if not keep.any():
        return float("nan")
    return float((np.asarray(predicted_on_triggered)[keep] == target).mean())
