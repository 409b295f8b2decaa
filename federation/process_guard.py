"""Run a command as the head of a process tree that ends with it: `python -m ...node_guard -- COMMAND...`.

`fingpt-client` runs its SuperNode through this guard. The SuperNode starts a SuperExec, which starts a
ClientApp per task; Flower ends those when their parent's PID stops existing, which never happens where
PID 1 does not reap orphans (containers, micro-VMs): a SuperNode that died stays a zombie, and its
SuperExec and ClientApps run on, pulling work from the next SuperNode on the same port. The guard is a
child subreaper, so every orphan of the tree becomes its child and is reaped; when the command ends or
the guard is told to stop (SIGTERM, SIGINT, SIGHUP, or the parent-death signal its starter sets), the
command gets SIGTERM to leave the SuperLink cleanly, and after a grace period every descendant that is
still running gets SIGKILL. The guard then ends the way the command ended (its exit code or its signal).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE_S = 10.0
POLL_S = 0.1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent(parent: int, signum: int) -> None:
    """In a child before `exec`: have Linux send `signum` when the parent dies, even by SIGKILL.

    The setting survives `exec` (not `fork`). A parent that died before `prctl` took effect is caught by
    comparing the parent PID.
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)


def _become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def _reap(head: int, head_status: int | None) -> int | None:
    """Collect every finished child without blocking; the head's wait status once it has ended."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return head_status
        if pid == 0:
            return head_status
        if pid == head:
            head_status = wait_status


def _descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def _signal_all(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def _stop_tree(head: int, head_status: int | None, deadline: float) -> int:
    """SIGTERM every descendant, SIGKILL those left at `deadline`, reap all; the head's wait status."""
    _signal_all(_descendants(), signal.SIGTERM)
    while (procs := _descendants()) and time.monotonic() < deadline:
        time.sleep(POLL_S)
        head_status = _reap(head, head_status)
    while procs:
        _signal_all(procs, signal.SIGKILL)
        time.sleep(POLL_S)
        head_status = _reap(head, head_status)
        procs = _descendants()
    head_status = _reap(head, head_status)
    # A head reaped by nobody here died of the SIGKILL above; a wait status of 9 says "killed by signal 9".
    return int(signal.SIGKILL) if head_status is None else head_status


def guard(command: list[str]) -> int:
    """Run `command` to its end under this guard; the wait status of the command.

    A stop request gives the whole tree STOP_GRACE_S in all before SIGKILL; so does the command's own end.
    """
    _become_subreaper()
    stop_requested: list[float] = []

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        if not stop_requested:
            stop_requested.append(time.monotonic())

    for signum in STOP_SIGNALS:
        signal.signal(signum, request_stop)
    parent = os.getpid()
    head = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(parent, signal.SIGKILL))
    status: int | None = None
    while status is None and not stop_requested:
        time.sleep(POLL_S)
        status = _reap(head.pid, None)
    if status is None:
        os.kill(head.pid, signal.SIGTERM)  # the SuperNode deregisters from the SuperLink on SIGTERM
    deadline = (stop_requested[0] if stop_requested else time.monotonic()) + STOP_GRACE_S
    while status is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
        status = _reap(head.pid, None)
    status = _stop_tree(head.pid, status, deadline)
    head.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return status


def end_like(wait_status: int) -> None:
    """Exit with the command's exit code, or die of the signal that ended it."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    sys.exit(os.waitstatus_to_exitcode(wait_status))


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "--" or len(argv) < 2:
        sys.exit("usage: python -m fingpt_federated.federation.process_guard -- COMMAND [ARG...]")
    end_like(guard(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
