"""What one caller can ask of `fingpt-infer serve`: per-request limits and a time limit.

The work of a request is bounded before it starts (records x text x series steps x passes, each
capped here), and its time is bounded while it runs: the service takes the model one chunk of
records at a time and checks the request's deadline before each chunk, so a request past its
time limit stops within one chunk (a thread cannot be killed; it can be given little to do).
How many requests are in progress, and in which order they get the model: infer/scheduling.py.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Each field is a `fingpt-infer serve` option of the same name (`max_body_bytes` is `--max-body-bytes`)."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_records: int = 32
    max_text_chars: int = 4_000
    max_series_steps: int = 256
    max_mc_samples: int = 8
    max_in_progress: int = 8
    time_limit_s: float = 30.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (value >= 0 if name == "max_mc_samples" else value > 0):
                raise ValueError(f"{option(name)} must be {'0 or more' if name == 'max_mc_samples' else 'positive'}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


PHRASES = {
    "max_records": "more records than the limit of {} per request",
    "max_mc_samples": "mc_samples over the limit of {}",
    "max_text_chars": "text longer than the limit of {} characters",
    "max_series_steps": "series longer than the limit of {} steps",
}


def limit_problem(loc: list[str | int], limits: Limits, name: str) -> dict[str, Any]:
    """A problem that names the limit (and the serve option that sets it), never the offending value."""
    value = getattr(limits, name)
    return {"loc": loc, "msg": f"{PHRASES[name].format(value)} ({option(name)})", "limit": {name: value}}


def request_problems(records: list[dict[str, Any]], mc_samples: int, limits: Limits, batch: bool) -> list[dict]:
    """Every limit a parsed request exceeds (records: the request's records as PredictRequest.batch gives them)."""
    problems = []
    if len(records) > limits.max_records:
        problems.append(limit_problem(["body", "records"], limits, "max_records"))
    if mc_samples > limits.max_mc_samples:
        problems.append(limit_problem(["body", "mc_samples"], limits, "max_mc_samples"))
    for i, record in enumerate(records[: limits.max_records]):
        at: list[str | int] = ["body", "records", i] if batch else ["body"]
        if len(record.get("text") or "") > limits.max_text_chars:
            problems.append(limit_problem([*at, "text"], limits, "max_text_chars"))
        if len(record.get("series") or []) > limits.max_series_steps:
            problems.append(limit_problem([*at, "series"], limits, "max_series_steps"))
    return problems


def passes(records: int, mc_samples: int, explain: bool) -> int:
    """Forward passes (a backward counted as two) a request costs: its priority for the model, smallest first."""
    return records * (1 + mc_samples + (2 if explain else 0))


class TimeLimitExceeded(Exception):
    """A request ran past its time limit (raised between chunks, where the work can stop cleanly)."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def check(self) -> None:
        if time.monotonic() >= self.end:
            raise TimeLimitExceeded(f"the request took longer than its time limit of {self.seconds} s")
