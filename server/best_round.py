"""Which round's global model is published: the best by a monitored validation metric, or the last.

`publish.select: best` (the default) takes the round whose global model scored best on the banks'
validation splits (the federation's aggregate of `publish.monitor`, by default `model.train.monitor`;
`publish.mode` max or min, by default min for loss and max otherwise); `last` takes the last round.
Only validation decides: the operator's test set stays a test set. A round with no validation value
(banks that withhold metrics under DP) cannot be chosen; when no round has one, the last round is
published and the choice says why. Ties go to the earlier round (fewer rounds of drift, less epsilon).

The choice is a function of the run's History alone, which every checkpoint holds: a resumed run
recomputes it from the checkpoint it continues, and the checkpointer never prunes the chosen round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fingpt_federated.model.task_metrics import TASK_METRICS, mode_of
from fingpt_federated.server.history import History

SELECTIONS = ("best", "last")
MODES = ("max", "min")


@dataclass(frozen=True)
class RoundChoice:
    """The round published and what it was chosen by, as the model card records it."""

    round: int
    select: str
    monitor: str
    mode: str
    value: float  # the monitored validation metric of `round` (NaN: not measured)
    last_round: int
    last_value: float
    note: str = ""  # why `select` could not be followed, if it could not

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "select": self.select,
            "monitor": f"validation {self.monitor}",
            "mode": self.mode,
            "value": self.value,
            "last_round": self.last_round,
            "last_value": self.last_value,
            "note": self.note,
        }

    def line(self) -> str:
        """One line for logs and reports."""
        text = f"round {self.round} of {self.last_round} (publish.select={self.select}, validation {self.monitor} "
        text += f"{_f(self.value)}, {self.mode} is best; last round {_f(self.last_value)})"
        return f"{text}: {self.note}" if self.note else text


@dataclass(frozen=True)
class RoundSelection:
    select: str = "best"
    monitor: str = "loss"
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"publish.select must be one of {SELECTIONS}, got {self.select!r}")
        if self.monitor not in TASK_METRICS:
            raise ValueError(f"publish.monitor must be one of {TASK_METRICS}, got {self.monitor!r}")
        if self.mode not in MODES:
            raise ValueError(f"publish.mode must be one of {MODES}, got {self.mode!r}")

    @classmethod
    def from_config(cls, cfg: DictConfig) -> RoundSelection:
        """From `publish.select/monitor/mode`; the monitor defaults to `model.train.monitor`."""
        monitor = OmegaConf.select(cfg, "publish.monitor") or OmegaConf.select(cfg, "model.train.monitor") or "loss"
        mode = OmegaConf.select(cfg, "publish.mode") or mode_of(str(monitor))
        return cls(str(OmegaConf.select(cfg, "publish.select") or "best"), str(monitor), str(mode))

    def best(self, history: History) -> tuple[int, float] | None:
        """(round, value) of the best trained round by the monitor, None when no round has it."""
        values = {r: v for r, v in history.validation(self.monitor).items() if r >= 1}
        if not values:
            return None
        sign = -1.0 if self.mode == "max" else 1.0
        best = min(values, key=lambda r: (sign * values[r], r))
        return best, values[best]

    def pinned(self, history: History) -> int | None:
        """The round whose checkpoint must outlive pruning (the best one; none under `last`)."""
        found = self.best(history) if self.select == "best" else None
        return found[0] if found else None

    def choose(self, history: History) -> RoundChoice:
        """The round to publish out of `history` (its last round when nothing else can be chosen)."""
        last = max((row.round for row in history.rows), default=0)
        values = history.validation(self.monitor)
        last_value = values.get(last, math.nan)
        if self.select == "last":
            return self._choice(last, last_value, last, last_value)
        found = self.best(history)
        if found is None:
            note = f"no round has a validation {self.monitor} (banks withheld it?): the last round is published"
            return self._choice(last, last_value, last, last_value, note)
        return self._choice(found[0], found[1], last, last_value)

    def _choice(self, chosen: int, value: float, last: int, last_value: float, note: str = "") -> RoundChoice:
        return RoundChoice(chosen, self.select, self.monitor, self.mode, value, last, last_value, note)


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"
