"""Helpers shared by the deployment tests: free loopback ports, small prepared banks, registered banks'
keys and their `fingpt-client` processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.data.federation_layout import FederationLayout, prepare_federation

# The same work as `fingpt-sim` with these overrides: 2 IID banks of generated news, tiny model.
OVERRIDES = [
    "model=tiny_encoder",
    "federation=iid",
    "federation.num_banks=2",
    "data.synthetic.rows_per_bank=60",
    "federation.rounds=2",
    "strategy.local_steps=2",
    "federation.fraction_evaluate=0",
]
RUN_TIMEOUT_S = 420


def rounds_in(metrics_path: Path, phase: str) -> dict[int, set[str]]:
    rows = json.loads(metrics_path.read_text())["rows"]
    found: dict[int, set[str]] = {}
    for row in rows:
        if row["phase"] == phase and row["status"] == "ok":
            found.setdefault(row["round"], set()).add(row["bank"])
    return found


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def synthetic_layout(folder: Path, num_banks: int, rows_per_bank: int = 60) -> FederationLayout:
    """`num_banks` IID banks of generated financial news, and the held-out test set."""
    data = OmegaConf.load(CONFIG_DIR / "data" / "synthetic_news.yaml")
    data.synthetic.rows_per_bank = rows_per_bank
    federation = OmegaConf.load(CONFIG_DIR / "federation" / "natural.yaml")
    federation.update({"partitioner": "iid", "key": None, "num_banks": num_banks, "min_size": 2})
    return prepare_federation(OmegaConf.create({"data": data, "federation": federation, "seed": 0}), folder)


def prepared_banks(folder: Path, num_banks: int) -> list[Path]:
    return list(synthetic_layout(folder, num_banks).bank_dirs)


def bank_env(flwr_home: Path) -> dict[str, str]:
    """The environment of a bank's process: its own FLWR_HOME, where its SuperNode installs apps."""
    return {**os.environ, "FLWR_HOME": str(flwr_home)}


def module_cli(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` with this interpreter, output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def registered_bank_key(workdir: Path, key: Path, name: str) -> Path:
    """`fingpt-client keygen` for a bank, then `fingpt-server register-bank` of its public key."""
    assert module_cli("fingpt_federated.client.cli", "keygen", "--key", str(key)).returncode == 0
    registered = module_cli(
        "fingpt_federated.server.cli", "register-bank", f"{key}.pub", "--name", name, "--workdir", str(workdir)
    )
    assert registered.returncode == 0, registered.stderr
    return key


def start_bank(
    server: str, ca: Path, key: Path, data: Path, runtime_port: int, flwr_home: Path, log: Path
) -> subprocess.Popen:
    """`fingpt-client start` for one bank, retrying long enough for a server started after it."""
    command = [
        sys.executable,
        "-m",
        "fingpt_federated.client.cli",
        "start",
        "--server",
        server,
        "--ca",
        str(ca),
        "--key",
        str(key),
        "--data",
        str(data),
        "--runtime-port",
        str(runtime_port),
        "--max-retries",
        "200",
        "--max-wait",
        "900",
    ]
    with open(log, "a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=bank_env(flwr_home))
