"""Where a bank keeps what it must not lose or share: its privacy ledger, SCAFFOLD variate, personalised model."""

from __future__ import annotations

from pathlib import Path


def bank_state_dir(data_path: str | Path, configured: str | Path | None = None) -> Path:
    """`configured` (`--state-dir`, node config `state-dir`), else `state` inside a prepared bank folder or
    beside a data config."""
    if configured:
        return Path(configured).expanduser()
    data = Path(data_path).expanduser()
    return (data if data.is_dir() else data.parent) / "state"
