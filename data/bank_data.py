"""What a bank trains and validates on, from wherever its node config points.

`data-path` is either a bank's own data-config YAML (deployment: the bank's real files, validated
and split here) or a folder prepared by `fingpt-sim` (one simulated bank's partition).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fingpt_federated.conf  # noqa: F401  (registers the ${shared_data:...} resolver a bank config may use)
from fingpt_federated.data.config import data_config
from fingpt_federated.data.loading import load_dataset, split_validation
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.storage import load_records, save_records
from fingpt_federated.structured_config import load_mapping


@dataclass
class BankData:
    name: str
    train: BankDataset
    valid: BankDataset | None
    test: BankDataset | None = None
    """The bank's own test split (a simulated bank with personalization on): never trained or validated on."""


def load_bank(path: str | Path) -> BankData:
    """The bank's train and validation sets; any invalid row raises `DataError` before training starts."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_prepared(path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return _load_from_config(path)
    raise FileNotFoundError(f"data-path {path} is neither a bank data config (.yaml) nor a prepared bank folder")


def save_bank(bank: BankData, folder: str | Path) -> Path:
    folder = Path(folder)
    save_records(bank.train, folder / "train")
    if bank.valid is not None:
        save_records(bank.valid, folder / "valid")
    if bank.test is not None:
        save_records(bank.test, folder / "test")
    (folder / "name.txt").write_text(bank.name, encoding="utf-8")
    return folder


def _load_prepared(folder: Path) -> BankData:
    name_file = folder / "name.txt"
    name = name_file.read_text(encoding="utf-8").strip() if name_file.is_file() else folder.name
    valid = load_records(folder / "valid") if (folder / "valid").is_dir() else None
    test = load_records(folder / "test") if (folder / "test").is_dir() else None
    return BankData(name=name, train=load_records(folder / "train"), valid=valid, test=test)


def _load_from_config(path: Path) -> BankData:
    cfg = data_config(load_mapping(path))
    train, valid = split_validation(load_dataset(cfg), cfg)
    return BankData(name=str(cfg["name"] or path.stem), train=train, valid=valid)
