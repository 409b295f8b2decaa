"""How a federation got to its final figure: the round and the seconds at which the global model first
reached a target accuracy, and how much its accuracy swings from round to round.

A final accuracy hides the two things issue 26 asks about: how long the federation took to get
somewhere (a run that reaches 0.80 in round 3 and one that crawls there in round 20 end alike), and
whether it is still climbing or wandering on a plateau. Targets are absolute accuracies
(`simulation.targets`) and shares of the pooled (centralized) model's accuracy when the run trained
that baseline (`simulation.pooled_targets`). Seconds are the federation's rounds summed (the
ServerApp's `round_seconds`: training and the banks' evaluation, not the central test-set
evaluation nor the start-up before round 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fingpt_federated.simulations.report import RoundRow, markdown_table
from fingpt_federated.simulations.table_format import figure


@dataclass(frozen=True)
class Target:
    label: str  # as the report names it: "0.8" or "0.95 x pooled"
    accuracy: float


@dataclass(frozen=True)
class Reach:
    target: Target
    round: int | None  # the first round whose global test accuracy is >= the target; None: never
    seconds: float  # the rounds' seconds summed up to that round; NaN: never, or a round was not timed


@dataclass(frozen=True)
class Progress:
    reached: list[Reach]
    best_round: int
    best_accuracy: float
    swing: float  # mean |change of test accuracy| between consecutive rounds, the run's last half
    largest_drop: float  # the largest fall of test accuracy from one round to the next (0: it never fell)

    def to_dict(self) -> dict[str, object]:
        return {
            "reached": [
                {"target": r.target.label, "accuracy": r.target.accuracy, "round": r.round, "seconds": r.seconds}
                for r in self.reached
            ],
            "best_round": self.best_round,
            "best_test_accuracy": self.best_accuracy,
            "swing_last_half": self.swing,
            "largest_drop": self.largest_drop,
        }


def targets(absolute: Sequence[float], of_pooled: Sequence[float], pooled: float) -> list[Target]:
    """The absolute targets, then the shares of `pooled` (none when pooled is NaN: no baseline trained)."""
    found = [Target(f"{a:g}", a) for a in absolute]
    if not math.isnan(pooled):
        found += [Target(f"{share:g} x pooled ({share * pooled:.4f})", share * pooled) for share in of_pooled]
    return found


def progress(rounds: Sequence[RoundRow], wanted: Sequence[Target]) -> Progress | None:
    """`rounds` from round 0 (the initial model) on, as simulations/report.py's round_rows gives them;
    None when no trained round has a global test accuracy."""
    trained = [r for r in rounds if r.round > 0]
    tested = [r for r in trained if not math.isnan(r.test_accuracy)]
    if not tested:
        return None
    best = max(tested, key=lambda r: r.test_accuracy)
    changes = [b.test_accuracy - a.test_accuracy for a, b in zip(tested, tested[1:], strict=False)]
    last_half = changes[len(changes) // 2 :]
    return Progress(
        reached=[_reach(trained, target) for target in wanted],
        best_round=best.round,
        best_accuracy=best.test_accuracy,
        swing=sum(abs(c) for c in last_half) / len(last_half) if last_half else math.nan,
        largest_drop=max([0.0, *(-c for c in changes)]),
    )


def _reach(trained: Sequence[RoundRow], target: Target) -> Reach:
    """Every trained round's seconds count, tested or not (under HE only the last round is tested)."""
    seconds = 0.0
    for row in trained:
        seconds += row.seconds
        if row.test_accuracy >= target.accuracy:  # False for NaN
            return Reach(target, row.round, seconds)
    return Reach(target, None, math.nan)


def progress_section(found: Progress) -> list[str]:
    """The report's section: one row per target, then the best round and the swing."""
    rows = [[r.target.label, "never" if r.round is None else r.round, figure(r.seconds, 1)] for r in found.reached]
    lines = ["## Progress: rounds and seconds to a target, and the swing"]
    if rows:
        lines.append(markdown_table(["global test accuracy >=", "first round", "seconds (rounds summed)"], rows))
    lines.append(
        f"Best round {found.best_round} ({figure(found.best_accuracy)}); round-to-round swing of the test accuracy "
        f"over the last half of the rounds {figure(found.swing)} (mean absolute change), largest drop "
        f"{figure(found.largest_drop)}."
    )
    return lines


def progress_lines(found: Progress) -> list[str]:
    """The console's lines: where each target was reached, and the swing."""
    lines = [
        f"reached {r.target.label}: " + ("never" if r.round is None else f"round {r.round}, {r.seconds:.1f} s")
        for r in found.reached
    ]
    swing = f"swing over the last half of the rounds {figure(found.swing)}, largest drop {figure(found.largest_drop)}"
    return [*lines, swing]
