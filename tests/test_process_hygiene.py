"""Nothing a bank, a simulation or a test starts outlives it: the process guard under `fingpt-client`,
the leftover check every test runs under, a bank killed with SIGKILL, and `fingpt-sim` stopped mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.process_watch import leftovers, session_processes

GUARD = [sys.executable, "-m", "fingpt_federated.federation.process_guard", "--"]
SESSION_START = time.time() - 60


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids among `pids` still running (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_the_guard_ends_the_orphans_of_its_command_and_exits_like_it():
    before = session_processes(SESSION_START)
    result = subprocess.run([*GUARD, "bash", "-c", "sleep 300 & sleep 301 & exit 3"], timeout=30)
    assert result.returncode == 3
    assert not {key for key in session_processes(SESSION_START) if key not in before}
    killed = subprocess.run([*GUARD, "bash", "-c", "kill -TERM $$"], timeout=30)
    assert killed.returncode == -signal.SIGTERM


def test_a_guard_whose_parent_is_killed_stops_the_whole_tree():
    """The parent (a stand-in for `fingpt-client`) dies by SIGKILL: its guard gets the parent-death signal."""
    starter = (
        "import os, signal, subprocess, sys\n"
        "from fingpt_federated.federation.process_guard import die_with_parent\n"
        "me = os.getpid()\n"
        f"p = subprocess.Popen({GUARD!r} + ['bash', '-c', '(sleep 302; true) & sleep 303 & wait'],\n"
        "    start_new_session=True, preexec_fn=lambda: die_with_parent(me, signal.SIGTERM))\n"
        "print(p.pid, flush=True); p.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    guard = psutil.Process(int(parent.stdout.readline()))
    deadline = time.monotonic() + 20
    while len(guard.children(recursive=True)) < 4:  # bash, its subshell, two sleeps
        assert time.monotonic() < deadline, "the guarded tree never started"
        time.sleep(0.1)
    tree = [guard.pid] + [p.pid for p in guard.children(recursive=True)]
    parent.kill()
    parent.wait()
    assert wait_gone(tree, timeout=5) == []


def test_die_with_parent_kills_a_child_whose_parent_already_died():
    """The race `prctl` cannot close by itself: the parent gone before the call."""
    code = subprocess.run(
        [sys.executable, "-c", "from fingpt_federated.federation.process_guard import die_with_parent as d; d(1, 15)"],
        timeout=30,
    ).returncode
    assert code == -signal.SIGTERM


def test_the_leftover_check_finds_orphans_kills_them_and_ignores_what_ends_in_time():
    before = session_processes(SESSION_START)
    quick = subprocess.Popen(["sleep", "1"])
    spawn_orphan = ["bash", "-c", "sleep 304 >/dev/null 2>&1 & echo $!"]
    orphan = int(subprocess.run(spawn_orphan, capture_output=True, text=True, check=True).stdout)
    assert psutil.Process(orphan).ppid() != os.getpid()  # re-parented: not a descendant any more
    left = leftovers(before, SESSION_START, linger_s=3)
    quick.wait()
    assert len(left) == 1 and f"pid {orphan}" in left[0] and "sleep 304" in left[0]
    assert wait_gone([orphan], timeout=5) == []
