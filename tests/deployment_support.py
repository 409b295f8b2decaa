"""Helpers shared by the deployment tests: free loopback ports and small prepared banks."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.data.federation_layout import FederationLayout, prepare_federation


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
