"""`privacy=dp_he` on the loopback deployment: TLS, SuperNode authentication, two banks that train
with DP-SGD, quantize and encrypt (BFV), an operator that only adds ciphertexts, the banks' updates
bound to their registered Flower nodes, and round 0 evaluated on the public initial state."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest
from deployment_support import (
    OVERRIDES,
    RUN_TIMEOUT_S,
    bank_env,
    free_port,
    module_cli,
    synthetic_layout,
)

from fingpt_federated.server.app import METRICS_JSON

pytestmark = pytest.mark.slow

DP = [
    "privacy=dp_he",
    "privacy.dp.logical_batch_size=16",
    "privacy.dp.physical_batch_size=8",
    "privacy.dp.accountant=rdp",
    "privacy.dp.noise_multiplier=1.0",
]


def test_dp_he_two_banks_two_rounds_on_loopback(tmp_path):
    workdir = tmp_path / "operator"
    assert (
        module_cli(
            "fingpt_federated.server.cli", "init-ca", "--workdir", str(workdir), "--host", "localhost"
        ).returncode
        == 0
    )
    ceremony = module_cli("fingpt_federated.client.cli", "he-keygen", "--out", str(tmp_path / "he"))
    assert ceremony.returncode == 0, ceremony.stderr
    layout = synthetic_layout(tmp_path / "data", 2)
    fleet_port, control_port = free_port(), free_port()
    banks = []
    try:
        for number, data in enumerate(layout.bank_dirs):
            key = tmp_path / f"bank{number}" / "bank.key"
            assert module_cli("fingpt_federated.client.cli", "keygen", "--key", str(key)).returncode == 0
            binding = module_cli(
                "fingpt_federated.server.cli",
                "register-bank",
                f"{key}.pub",
                "--name",
                f"bank_{number:02d}",
                "--binding-key",
                f"{key}.binding",
                "--workdir",
                str(workdir),
            )
            assert binding.returncode == 0, binding.stderr
            banks.append(_start(tmp_path, number, key, data, fleet_port, workdir))
        run_dir = tmp_path / "run"
        server = [
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
            "--he-public-context",
            str(tmp_path / "he" / "he_public.ctx"),
            *OVERRIDES,
            *DP,
        ]
        result = subprocess.run(server, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finally:
        for bank in banks:
            tree = [psutil.Process(bank.pid), *psutil.Process(bank.pid).children(recursive=True)]
            for member in tree:
                member.kill()
            psutil.wait_procs(tree, timeout=30)

    rows = json.loads((run_dir / METRICS_JSON).read_text())["rows"]
    trained = [r for r in rows if r["phase"] == "train" and r["status"] == "ok" and r["bank"] != "federation"]
    assert {(r["round"], r["bank"]) for r in trained} == {(n, f"bank_{b:02d}") for n in (1, 2) for b in (0, 1)}
    for bank in ("bank_00", "bank_01"):
        first, second = (
            next(r["metrics"]["epsilon"] for r in trained if r["round"] == n and r["bank"] == bank) for n in (1, 2)
        )
        assert 0 < first < second <= 8.0  # the DP budget is spent and accounted as without HE
    assert any(r["round"] == 0 and "accuracy" in r["metrics"] for r in rows if r["phase"] == "central")
    assert (run_dir / "global_state.he").stat().st_size > 0 and not (run_dir / "global_state.safetensors").exists()


def _start(tmp_path, number, key, data, fleet_port, workdir) -> subprocess.Popen:
    """A bank node with its own DP state folder and the HE secrets in its node config."""
    command = [
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
        "--state-dir",
        str(tmp_path / f"bank{number}" / "state"),
        "--he-context",
        str(tmp_path / "he" / "he_secret.ctx"),
        "--binding-key",
        f"{key}.binding",
    ]
    with open(tmp_path / f"bank{number}.log", "a") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=bank_env(tmp_path / f"bank{number}" / "flwr-home")
        )
