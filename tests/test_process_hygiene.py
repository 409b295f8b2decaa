"""Nothing a bank, a simulation or a test starts outlives it: the process guard under `fingpt-client`,
the leftover check every test runs under, a bank killed with SIGKILL, and `fingpt-sim` stopped mid-run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fingpt_federated.client.supernode import NodeSettings, PortTaken, classify_exit, runtime_port_free
from fingpt_federated.server.app import CHECKPOINTS, METRICS_JSON
from tests.deployment_support import (
    OVERRIDES,
    RUN_TIMEOUT_S,
    free_port,
    module_cli,
    registered_bank_key,
    rounds_in,
    start_bank,
    synthetic_layout,
)
from tests.process_watch import MARK_VARIABLE, leftovers, mark_session, session_processes

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


def commands_of(pid: int) -> list[str]:
    """The command lines of `pid`'s descendants still running, shortened, for a failure message."""
    lines = []
    for child in descendants_of(pid):
        try:
            lines.append(" ".join(psutil.Process(child).cmdline())[:120])
        except psutil.Error:
            pass
    return lines


def descendants_of(pid: int) -> list[int]:
    root = psutil.Process(pid)
    return [root.pid, *(p.pid for p in root.children(recursive=True))]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the server ended before {path} was written"
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.5)


def test_each_xdist_worker_marks_its_processes_as_its_own_session(monkeypatch):
    """Workers inherit the controller's mark; without their own, one worker's leftover check would
    count (and kill) the processes of the test running in the other."""
    monkeypatch.setenv(MARK_VARIABLE, "controller")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    assert mark_session() == "controller-gw1"
    assert mark_session() == "controller-gw1"
    assert os.environ[MARK_VARIABLE] == "controller-gw1"


@pytest.mark.slow
def test_a_bank_killed_with_sigkill_leaves_nothing_and_rejoins_the_run(tmp_path):
    workdir = tmp_path / "operator"
    init_ca = module_cli("fingpt_federated.server.cli", "init-ca", "--workdir", str(workdir), "--host", "localhost")
    assert init_ca.returncode == 0, init_ca.stderr
    layout = synthetic_layout(tmp_path / "data", 2)
    fleet_port, control_port = free_port(), free_port()
    banks = []
    for number, data in enumerate(layout.bank_dirs):
        key = registered_bank_key(workdir, tmp_path / f"bank{number}" / "bank.key", layout.bank_names[number])
        args = (f"localhost:{fleet_port}", workdir / "tls" / "ca.crt", key, data, free_port())
        banks.append((args, tmp_path / f"bank{number}" / "flwr-home", tmp_path / f"bank{number}.log"))
    clients = [start_bank(*args, home, log) for args, home, log in banks]
    run_dir = tmp_path / "run"
    server_run = [
        sys.executable,
        "-m",
        "fingpt_federated.server.cli",
        "run",
        "--workdir",
        str(workdir),
        "--fleet-host",
        "127.0.0.1",
        "--fleet-port",
        str(fleet_port),
        "--control-port",
        str(control_port),
        "--test-data",
        str(layout.test_dir),
        "--bank-wait",
        "300",
        "--run-dir",
        str(run_dir),
    ]
    overrides = [o for o in OVERRIDES if not o.startswith("federation.rounds=")]
    overrides += ["federation.rounds=3", "strategy.round_timeout=45"]  # the round a bank dies in fails by then
    server = subprocess.Popen([*server_run, *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(run_dir / CHECKPOINTS / "round_0001" / "meta.json", server, RUN_TIMEOUT_S)
        tree = descendants_of(clients[0].pid)
        assert len(tree) >= 4, "fingpt-client, its guard, the SuperNode and its SuperExec"
        killed_at = time.monotonic()
        clients[0].kill()
        clients[0].wait()
        assert wait_gone(tree, timeout=15) == [], "the killed bank's SuperNode tree outlived it"
        gone_after_s = time.monotonic() - killed_at
        assert runtime_port_free(banks[0][0][4]), "the killed bank's runtime port is still taken"
        clients[0] = start_bank(*banks[0][0], banks[0][1], banks[0][2])
        out, _ = server.communicate(timeout=RUN_TIMEOUT_S)
        if server.returncode != 0:  # the round the bank died in failed loudly (2 banks needed): resume the run
            assert "round 2 train: 1 of 2 sampled banks succeeded" in out, out[-4000:]
            resumed = subprocess.run(server_run, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
        train = rounds_in(run_dir / METRICS_JSON, "train")
        assert all(len(train[r] - {"federation"}) == 2 for r in (2, 3)), f"the restarted bank did not rejoin: {train}"
        print(f"killed bank's tree of {len(tree)} processes gone {gone_after_s:.1f}s after SIGKILL; rounds {train}")
    finally:
        for proc in [server, *clients]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


def wait_for_descendant(proc: subprocess.Popen, marker: str, timeout: float) -> None:
    """Until a descendant of `proc` has `marker` in its command line."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the process ended before any {marker} started"
        assert time.monotonic() < deadline, f"no {marker} within {timeout:.0f}s"
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if marker in " ".join(child.cmdline()):
                    return
            except psutil.Error:
                pass
        time.sleep(0.5)


def _default_sigint() -> None:
    """Ctrl-C's default action in the child, whatever pytest was started with: a shell without job
    control starts `cmd &` with SIGINT ignored, which Python and its children inherit and keep (a sim
    started so rightly ignores SIGINT, and the SIGINT case would run to its end)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


STOP_WAIT_S = 120  # under load: the log stream's 10 s, the guard's 10 s grace, Ray's actors ending


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_fingpt_sim_stopped_mid_run_stops_flower_and_ray(tmp_path, signum):
    before = session_processes(SESSION_START)
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fingpt_federated.simulations.sim",
            *(o for o in OVERRIDES if not o.startswith("federation.rounds=")),
            "federation.rounds=20",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        wait_for_descendant(sim, "ClientAppActor", RUN_TIMEOUT_S)
        tree = descendants_of(sim.pid)
        assert any("flwr-simulation" in " ".join(psutil.Process(pid).cmdline()) for pid in tree)
        sim.send_signal(signum)
        try:
            out, _ = sim.communicate(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired as late:
            output = late.output or b""  # bytes: communicate decodes only at the end
            tail = (output.decode(errors="replace") if isinstance(output, bytes) else output)[-3000:]
            running = commands_of(sim.pid)
            pytest.fail(f"not stopped {STOP_WAIT_S}s after {signum.name}; running: {running}; output: {tail}")
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert sim.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), out[-3000:]
    assert wait_gone(tree, timeout=20) == []  # after SIGKILL: the guard's grace period, then SIGKILL
    assert leftovers(before, SESSION_START, linger_s=10) == []


def test_a_taken_runtime_port_is_one_line_naming_the_port_and_the_option(tmp_path, capsys):
    from fingpt_federated.client.cli import main

    bank = synthetic_layout(tmp_path / "data", 2).bank_dirs[0]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(
            ["start", "--insecure", "--server", "127.0.0.1:9", "--data", str(bank), "--runtime-port", str(port)]
        )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err == (
        f"fingpt-client: error: runtime port {port} on 127.0.0.1 is already in use (another bank's node on this "
        "machine?); choose a free one with --runtime-port"
    )
    # taken between that check and the SuperNode's own bind: Flower's traceback becomes the same line
    settings = NodeSettings("127.0.0.1:9", None, None, bank, "bank_00", runtime_port=port)
    failure = classify_exit(
        settings, 1, ["ERROR: [Errno 98] ...", "RuntimeError: SuperNode Runtime HTTP API failed to start."]
    )
    assert isinstance(failure, PortTaken) and failure.exit_code == 2 and str(failure) in err
