"""Which processes the test session started, so a test that leaves one running fails.

A process counts as the session's when it descends from the pytest process, or when it carries the
session's mark in its environment: a process whose parent died is re-parented to PID 1 and is no
longer a descendant, but it keeps the environment it inherited. Other sessions on the machine carry
other marks.
"""

from __future__ import annotations

import os
import time
import uuid

import psutil

MARK_VARIABLE = "FINGPT_TEST_SESSION"
LINGER_S = 20.0
"""How long a process started by a test may take to end after it: a ClientApp or a Ray worker exits
a few seconds after its run has finished."""

Key = tuple[int, float]


def mark_session() -> str:
    """Put the session's mark in this process's environment, inherited by every process it starts.

    Under pytest-xdist each worker is a session of its own: the workers inherit the controller's
    mark, so each appends its name, or one worker's check would kill the processes of the other's
    running test."""
    mark = os.environ.setdefault(MARK_VARIABLE, uuid.uuid4().hex)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and not mark.endswith(f"-{worker}"):
        mark = os.environ[MARK_VARIABLE] = f"{mark}-{worker}"
    return mark


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked(proc: psutil.Process, mark: str, since: float) -> bool:
    try:
        return proc.create_time() >= since and proc.environ().get(MARK_VARIABLE) == mark
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def session_processes(since: float) -> dict[Key, psutil.Process]:
    """The live descendants of this process, and every live process started since `since` with our mark."""
    me = psutil.Process()
    mark = os.environ.get(MARK_VARIABLE, "")
    found = {}
    candidates = me.children(recursive=True) + [p for p in psutil.process_iter() if _marked(p, mark, since)]
    for proc in candidates:
        if proc.pid != me.pid and _alive(proc):
            try:
                found[(proc.pid, proc.create_time())] = proc
            except psutil.NoSuchProcess:
                pass
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:200]}"
    except psutil.NoSuchProcess:
        return f"pid {proc.pid} (gone)"


def _started_since(proc: psutil.Process, before: dict[Key, psutil.Process]) -> bool:
    """Whether neither `proc` nor any of its ancestors was running when `before` was taken: the
    children that a bank started by a module's fixture starts later belong to that fixture."""
    try:
        return not any((p.pid, p.create_time()) in before for p in [proc, *proc.parents()])
    except psutil.NoSuchProcess:
        return False


def leftovers(before: dict[Key, psutil.Process], since: float, linger_s: float = LINGER_S) -> list[str]:
    """The processes started since `before` was taken that are still running after `linger_s`; they are
    killed (so the next test does not inherit them) and described."""
    deadline = time.monotonic() + linger_s
    while True:
        left = {key: proc for key, proc in session_processes(since).items() if _started_since(proc, before)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    described = [describe(proc) for proc in left.values()]
    for proc in left.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(left.values()), timeout=10)
    return described
