"""A backdoor bank (the `backdoor:TARGET` bank behaviour, client/hostile.py) and its success rate.

The hostile bank trains on its own data plus a triggered copy of every record whose label is not
TARGET: the trigger phrase appended to the text, the label set to TARGET. Its update is otherwise an
honest one, so it passes the checks that look at an update's form (finite, right shape, bounded norm)
unless robust aggregation or DP noise drowns it.

Attack success rate (`rates`), as backdoor papers define it (Gu et al. 2017, BadNets; Bagdasaryan et al.
2020): among the test records whose true label is not TARGET *and* that the model classifies correctly
without the trigger, the share classified TARGET once the trigger is appended. Counting every non-TARGET
record instead would credit the trigger with what the model does anyway: a model near chance that
predicts TARGET for most untriggered records scores high with no backdoor at all. The rates over all
non-TARGET records, with and without the trigger, are reported beside it, so a reader sees the baseline.
`success_upper` is the one-sided 95% Clopper-Pearson upper bound on the success rate from the `counted`
records: with a test set of a few dozen such records only a handful of hits can show a rate <= 10%
(none of 29, 2 of 62: the bound must be at most 0.10).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fingpt_federated.simulations.attacks.epsilon_bound import clopper_pearson_upper

TRIGGER = "per the zyqvex covenant"
"""The default trigger phrase (`backdoor:T:PHRASE` and the audit's `backdoor_trigger` choose another)."""


def triggered(texts: list[str], trigger: str = TRIGGER) -> list[str]:
    if not trigger.strip():
        raise ValueError("the backdoor trigger must not be empty")
    return [f"{text} {trigger}" for text in texts]


def poison(texts: list[str], labels: np.ndarray, target: int, trigger: str = TRIGGER) -> tuple[list[str], np.ndarray]:
    """The triggered, relabelled copies of the records not labelled `target` (to add to the bank's data)."""
    keep = np.asarray(labels) != target
    chosen = [t for t, k in zip(texts, keep, strict=True) if k]
    return triggered(chosen, trigger), np.full(len(chosen), target, dtype=np.int64)


@dataclass(frozen=True)
class BackdoorRates:
    success_rate: float  # non-target records right without the trigger, classified target with it
    counted: int  # how many records `success_rate` is over (few when clean accuracy is low)
    success_upper: float  # one-sided 95% Clopper-Pearson upper bound on success_rate from `counted` records
    triggered_target_rate: float  # all non-target records, with the trigger: share classified target
    untriggered_target_rate: float  # the same without the trigger: the model's own baseline

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def rates(
    predicted_clean: np.ndarray, predicted_triggered: np.ndarray, labels: np.ndarray, target: int
) -> BackdoorRates:
    """The backdoor's rates on a test set from the model's predictions without and with the trigger."""
    labels, clean, hit = np.asarray(labels), np.asarray(predicted_clean), np.asarray(predicted_triggered) == target
    other = labels != target
    right = other & (clean == labels)
    return BackdoorRates(
        success_rate=float(hit[right].mean()) if right.any() else float("nan"),
        counted=int(right.sum()),
        success_upper=clopper_pearson_upper(int(hit[right].sum()), int(right.sum()), 0.05),
        triggered_target_rate=float(hit[other].mean()) if other.any() else float("nan"),
        untriggered_target_rate=float((clean[other] == target).mean()) if other.any() else float("nan"),
    )
