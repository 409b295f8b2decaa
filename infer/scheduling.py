"""Who gets the model, and when: admission of requests and their order between chunks.

A request's cost is in units of one record through one pass (limits.passes). The model runs one
chunk at a time; between chunks it goes to the waiting request of least cost (ties: the
earliest), so an ordinary request waits for the chunk in progress, not for every large request
that arrived before it. The scheduler learns the seconds per unit from the chunks it runs and
refuses at once a request that cannot finish within the time limit behind the work already
admitted ahead of it (503 with a Retry-After of that work's expected time), instead of admitting
it only to stop it at its deadline with its work wasted. A request with nothing ahead of it is
never refused for time; at most `capacity` requests are in progress at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fingpt_federated.infer.limits import TimeLimitExceeded

T = TypeVar("T")
RATE_WEIGHT = 0.3  # of the latest chunk in the running estimate of seconds per unit


class PriorityLock:
    """A lock handed to the waiter with the smallest key (ties: the earliest), not to whichever thread wins the race."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._held = False
        self._waiting: list[tuple[Any, int]] = []
        self._tickets = itertools.count()

    def acquire(self, key: Any, timeout: float | None = None) -> bool:
        entry = (key, next(self._tickets))
        with self._condition:
            heapq.heappush(self._waiting, entry)
            got = self._condition.wait_for(lambda: not self._held and self._waiting[0] == entry, timeout)
            self._waiting.remove(entry)
            heapq.heapify(self._waiting)
            if got:
                self._held = True
            self._condition.notify_all()  # the head of the line may have changed
            return got

    def release(self) -> None:
        with self._condition:
            self._held = False
            self._condition.notify_all()


@dataclass
class Job:
    """An admitted request: its cost and the units not yet run."""

    id: int
    cost: int
    pending: int


class Busy(Exception):
    """No room for a request now: the message names the limit; retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int, limit: dict[str, float]) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit


class Scheduler:
    def __init__(self, capacity: int | None = None, time_limit_s: float | None = None) -> None:
        self.capacity = capacity
        self.time_limit_s = time_limit_s
        self.lock = PriorityLock()  # one forward (and its dropout/hook state) at a time
        self.seconds_per_unit: float | None = None
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._mutex = threading.Lock()

    @property
    def in_progress(self) -> int:
        return len(self._jobs)

    def admit(self, cost: int) -> Job:
        """A job for a request of `cost` units, or Busy (at capacity, or it would finish past the time limit)."""
        with self._mutex:
            rate = self.seconds_per_unit
            if self.capacity is not None and len(self._jobs) >= self.capacity:
                total = sum(job.pending for job in self._jobs.values())
                raise Busy(
                    f"{self.capacity} requests in progress, the limit (--max-in-progress)",
                    max(1, math.ceil(total * rate)) if rate else 1,
                    {"max_in_progress": self.capacity},
                )
            ahead = sum(job.pending for job in self._jobs.values() if job.cost <= cost)
            if ahead and rate and self.time_limit_s and (ahead + cost) * rate > self.time_limit_s:
                wait = max(1, math.ceil(ahead * rate))
                raise Busy(
                    f"the work ahead would take about {wait} s and this request about {math.ceil(cost * rate)} s "
                    f"more: over the time limit of {self.time_limit_s} s (--time-limit-s)",
                    wait,
                    {"time_limit_s": self.time_limit_s},
                )
            job = Job(next(self._ids), cost, cost)
            self._jobs[job.id] = job
            return job

    def leave(self, job: Job) -> None:
        with self._mutex:
            self._jobs.pop(job.id, None)

    def run(self, job: Job | None, units: int, work: Callable[[], T], timeout: float | None = None) -> T:
        """`work` (`units` of `job`, or unscheduled work first in line when job is None) with the model held."""
        key = (job.cost, job.id) if job is not None else (-1, -1)
        if not self.lock.acquire(key, timeout):
            raise TimeLimitExceeded("the request's time limit passed while it waited for the model")
        try:
            started = time.perf_counter()
            result = work()
            self._learn(units, time.perf_counter() - started)
            return result
        finally:
            if job is not None:
                with self._mutex:
                    job.pending = max(0, job.pending - units)
            self.lock.release()

    def _learn(self, units: int, seconds: float) -> None:
        if units <= 0:
            return
        latest = seconds / units
        with self._mutex:
            previous = self.seconds_per_unit
            self.seconds_per_unit = latest if previous is None else (1 - RATE_WEIGHT) * previous + RATE_WEIGHT * latest
