"""A simulated federation on disk: one folder per bank (its train and validation rows) and a shared test set.

With personalization on (`personalize.steps > 0`) each bank's folder also holds its own test split,
`personalize.test_fraction` of its rows held out before its train/validation split: what the bank's
global, personalised and alone models are compared on (simulations/personalization.py).

Every bank's ClientApp then loads its folder through `data.bank_data.load_bank`, exactly as a real
bank loads its own data, so simulation and deployment share one data path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fingpt_federated.conf.schema import FederationConfig, PersonalizeConfig
from fingpt_federated.data.bank_data import BankData, load_bank, save_bank
from fingpt_federated.data.columns import canonical
from fingpt_federated.data.config import data_config
from fingpt_federated.data.loading import as_dict, hold_out_test
from fingpt_federated.data.partitioning import bank_names, merge_key_values, partition_indices
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.splits import split_train_valid
from fingpt_federated.data.synthetic import write_federation
from fingpt_federated.structured_config import build

log = logging.getLogger(__name__)


@dataclass
class FederationLayout:
    bank_dirs: list[Path]
    bank_names: list[str]
    test_dir: Path
    class_names: list[str]
    num_features: int
    train_counts: np.ndarray  # banks x classes, rows each bank trains on
    valid_counts: np.ndarray


def materialize_data_config(data_cfg: Mapping[str, Any] | DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """The data config with generated files filled in when it asks for synthetic data."""
    cfg = data_config(data_cfg)
    spec = cfg["synthetic"]
    if not spec:
        return cfg
    paths = write_federation(
        spec["task"],
        Path(out_dir) / "synthetic_data",
        int(spec["num_banks"]),
        int(spec["rows_per_bank"]),
        int(spec["seed"]),
    )
    cfg["files"]["train"] = str(paths["train"])
    if "series" in paths:
        cfg["series"]["path"] = str(paths["series"])
    return cfg


def partition(pool: BankDataset, fed: FederationConfig, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Row indices of each bank in `pool`, and the banks' names."""
    keys = None
    if fed.partitioner == "natural":
        if fed.key not in pool.keys:
            raise ValueError(f"federation.key={fed.key!r} must be one of data.keep_columns {sorted(pool.keys)}")
        keys = pool.keys[fed.key]
        if fed.key_map or fed.other_bank is not None:
            keys = _merged_keys(keys, fed)
        if fed.bins:
            keys = keys.astype(float)
    parts = partition_indices(
        pool.labels,
        fed.num_banks,
        fed.partitioner,
        alpha=fed.alpha,
        keys=keys,
        bins=fed.bins,
        min_size=fed.min_size,
        seed=seed,
    )
    names = bank_names(fed.partitioner, len(parts), keys, fed.bins, key_name=str(fed.key))
    return parts, names


def _merged_keys(keys: np.ndarray, fed: FederationConfig) -> np.ndarray:
    """The key values merged by `federation.key_map` / `other_bank`, each merge logged."""
    if fed.bins:
        raise ValueError(
            "federation.key_map and federation.other_bank merge key values; they cannot be combined "
            "with federation.bins (bands of a numeric key)"
        )
    canonical_map = {canonical(value): str(name) for value, name in fed.key_map.items()}
    unknown = sorted(set(canonical_map) - set(keys.tolist()))
    if unknown:
        log.warning("federation.key_map: %s values %s never occur", fed.key, ", ".join(unknown))
    merged_keys, merges = merge_key_values(keys, canonical_map, fed.min_size, fed.other_bank)
    for name, values in merges.items():
        counts = ", ".join(f"{value} ({int((keys == value).sum())})" for value in values)
        log.warning("natural split: %s values %s merged into bank %s=%s", fed.key, counts, fed.key, name)
    return merged_keys


def prepare_federation(cfg: Mapping[str, Any] | DictConfig, out_dir: str | Path) -> FederationLayout:
    """Load `cfg.data`, hold out the global test set, deal the rest out to banks, and save it all."""
    root = as_dict(cfg)
    out_dir = Path(out_dir)
    data_cfg = materialize_data_config(root["data"], out_dir)
    pool, test = hold_out_test(data_cfg)
    seed = int(root.get("seed", 0))
    fed = build(FederationConfig, root["federation"], "federation")  # over the defaults, checked
    parts, names = partition(pool, fed, seed)
    personal = build(PersonalizeConfig, root.get("personalize") or {}, "personalize")
    bank_dirs, train_counts, valid_counts = [], [], []
    for number, (rows, name) in enumerate(zip(parts, names, strict=True)):
        own_test = None
        if personal.steps > 0:  # the bank's own test split first (stratified, seeded apart from its validation)
            rows, test_idx = split_train_valid(rows, pool.labels, personal.test_fraction, seed + len(parts) + number)
            own_test = pool.subset(test_idx)
        train_idx, valid_idx = split_train_valid(rows, pool.labels, fed.valid_fraction, seed + number)
        train, valid = pool.subset(train_idx), pool.subset(valid_idx)
        bank = BankData(name=name, train=train, valid=valid, test=own_test)
        bank_dirs.append(save_bank(bank, out_dir / "banks" / f"bank_{number:02d}"))
        train_counts.append(train.label_counts())
        valid_counts.append(valid.label_counts())
    test_dir = save_bank(BankData(name="global_test", train=test, valid=None), out_dir / "test")
    return FederationLayout(
        bank_dirs, names, test_dir, pool.class_names, pool.num_features, np.array(train_counts), np.array(valid_counts)
    )


TRAINING_TEXTS = "training texts (all banks)"


def layout_texts(layout: FederationLayout) -> dict[str, list[str] | None]:
    """The texts of a prepared federation by data set (all banks' training, validation; the test set)."""
    banks = [load_bank(folder) for folder in layout.bank_dirs]
    test = load_bank(layout.test_dir).train.texts

    def joined(parts: list[BankDataset | None]) -> list[str] | None:
        texts = [text for part in parts if part is not None and part.texts is not None for text in part.texts]
        return texts or None

    return {
        TRAINING_TEXTS: joined([bank.train for bank in banks]),
        "validation texts (all banks)": joined([bank.valid for bank in banks]),
        "test texts": None if test is None else list(test),
    }
