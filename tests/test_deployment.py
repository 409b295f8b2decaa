"""The deployment end to end on loopback, through the two commands operator and banks run:
TLS and SuperNode authentication, SuperLink + 2 SuperNodes, 2 rounds with final state and
metrics, and a server killed after round 1 that resumes at round 2 when restarted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fingpt_federated.server.app import CHECKPOINTS, FINAL_STATE, METRICS_JSON
from tests.deployment_support import OVERRIDES, RUN_TIMEOUT_S, bank_env, free_port, rounds_in, synthetic_layout

pytestmark = pytest.mark.slow


def cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def kill_tree(proc: psutil.Process) -> None:
    """SIGKILL a process and all its descendants at once: a crash, nothing runs its clean-up."""
    tree = [proc, *proc.children(recursive=True)]
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """An operator workdir with CA and two accepted banks, whose nodes are started (and retry) first."""
    root = tmp_path_factory.mktemp("deployment")
    workdir = root / "operator"
    init_ca = cli("fingpt_federated.server.cli", "init-ca", "--workdir", str(workdir), "--host", "localhost")
    assert init_ca.returncode == 0
    layout = synthetic_layout(root / "data", 2)
    fleet_port, control_port = free_port(), free_port()
    banks = []
    for number, data in enumerate(layout.bank_dirs):
        key = root / f"bank{number}" / "bank.key"
        assert cli("fingpt_federated.client.cli", "keygen", "--key", str(key)).returncode == 0
        registered = cli(
            "fingpt_federated.server.cli",
            "register-bank",
            str(key) + ".pub",
            "--name",
            layout.bank_names[number],  # the bank's data name: a node answers only for the name it is registered as
            "--workdir",
            str(workdir),
        )
        assert registered.returncode == 0, registered.stderr
        log = open(root / f"bank{number}.log", "w")
        banks.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fingpt_federated.client.cli",
                    "start",
                    "--server",
                    f"localhost:{fleet_port}",
                    "--ca",
                    str(workdir / "tls" / "ca.crt"),
                    "--key",
                    str(key),
                    "--data",
                    str(data),
                    "--runtime-port",
                    str(free_port()),
                    "--max-retries",
                    "200",
                    "--max-wait",
                    "900",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=bank_env(root / f"bank{number}" / "flwr-home"),
            )
        )
    server_args = [
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
    ]
    try:
        yield {"root": root, "server_args": server_args, "banks": banks, "names": set(layout.bank_names)}
    finally:
        for bank in banks:
            if bank.poll() is None:
                kill_tree(psutil.Process(bank.pid))
                bank.wait(timeout=30)


def server_command(federation, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fingpt_federated.server.cli",
        *federation["server_args"],
        "--run-dir",
        str(run_dir),
        *overrides,
    ]


def test_the_task_shape_comes_from_the_data_config_or_the_operators_test_set(tmp_path):
    from fingpt_federated.server.deployment import federation_spec, load_config

    news = federation_spec(load_config(["data=synthetic_news"], tmp_path), None)
    assert (news.class_names, news.num_features, news.test_dir) == (["bearish", "bullish", "neutral"], 0, None)
    credit = federation_spec(load_config(["data=synthetic_credit"], tmp_path), None)
    assert (credit.class_names, credit.num_features) == (["repaid", "default"], 3)
    with pytest.raises(ValueError, match="--test-data"):
        federation_spec(load_config(["data=synthetic_aml"], tmp_path), None)
    test_dir = synthetic_layout(tmp_path / "data", 2).test_dir
    held_out = federation_spec(load_config(["data=synthetic_news"], tmp_path), test_dir)
    assert held_out.test_dir == str(test_dir) and held_out.class_names == news.class_names


def test_two_banks_two_rounds_over_tls_write_final_state_and_metrics(federation):
    run_dir = federation["root"] / "run-complete"
    result = subprocess.run(
        server_command(federation, run_dir, *OVERRIDES), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "banks online: 2/2" in result.stdout and "completed" in result.stdout
    assert (run_dir / FINAL_STATE).stat().st_size > 0
    train = rounds_in(run_dir / METRICS_JSON, "train")
    assert {r: banks - {"federation"} for r, banks in train.items()} == {1: federation["names"], 2: federation["names"]}
    summary = json.loads((run_dir / "deployment.json").read_text())
    assert summary["status"] == "finished:completed"
    assert all(bank.poll() is None for bank in federation["banks"]), "a bank's node died during the run"


def test_a_server_killed_after_round_one_resumes_at_round_two(federation):
    run_dir = federation["root"] / "run-killed"
    first = subprocess.Popen(
        server_command(federation, run_dir, *OVERRIDES),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    round_one = run_dir / CHECKPOINTS / "round_0001" / "meta.json"
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not round_one.is_file():
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "round 1 was never checkpointed"
        time.sleep(0.5)
    kill_tree(psutil.Process(first.pid))
    first.communicate(timeout=30)
    assert not (run_dir / CHECKPOINTS / "round_0002").exists() and not (run_dir / FINAL_STATE).exists()

    resumed = subprocess.run(server_command(federation, run_dir), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-4000:]
    assert "resuming with the config of" in out and "1 of 2 rounds done" in out
    assert "left unfinished by a previous server process" in out
    assert (run_dir / CHECKPOINTS / "round_0002").is_dir() and (run_dir / FINAL_STATE).is_file()
    train = rounds_in(run_dir / METRICS_JSON, "train")
    assert sorted(train) == [1, 2] and all(len(banks - {"federation"}) == 2 for banks in train.values())


def test_banks_leave_cleanly_when_stopped(federation):
    for bank in federation["banks"]:
        bank.send_signal(signal.SIGTERM)
    for number, bank in enumerate(federation["banks"]):
        assert bank.wait(timeout=60) == 0
        log = (federation["root"] / f"bank{number}.log").read_text()
        assert "data ok: bank" in log and "reached the SuperLink" in log
