"""A data config in, a validated `BankDataset` out: the one way every command reads a bank's data.

Nothing is returned until every row has passed: a run never starts on data that fails validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.data.columns import (
    canonical,
    labels_from,
    require_columns,
    texts_from,
    where,
)
from fingpt_federated.data.config import data_config
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.features import features_from
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.series import Series, long_series, wide_series, window_series
from fingpt_federated.data.splits import split_train_valid, time_split_indices
from fingpt_federated.data.tables import read_table

LAYOUTS = ("wide", "long", "windows")


@dataclass
class Splits:
    train: BankDataset
    valid: BankDataset
    test: BankDataset


def as_dict(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """A plain, resolved dict of a (Hydra) config section."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def load_dataset(data_cfg: Mapping[str, Any] | DictConfig, which: str = "train") -> BankDataset:
    """The records of `data_cfg.files[which]` ("train" or "test"), validated."""
    cfg = data_config(data_cfg)
    path = cfg["files"][which]
    if not path:
        raise ValueError(f"data config {cfg['name']!r} has no files.{which}")
    table = read_table(path, cfg["format"], cfg["encoding"], cfg["table"])
    return table_to_dataset(table, cfg)


def has_test_file(data_cfg: Mapping[str, Any] | DictConfig) -> bool:
    return bool(data_config(data_cfg)["files"]["test"])


def load_splits(data_cfg: Mapping[str, Any] | DictConfig) -> Splits:
    """Deterministic train / validation / test sets of one data config (centralized use, benchmarks).

    The test set is `files.test` when given, else `split.test_fraction` of the rows (the latest by
    `split.by_time` when set, else a stratified random draw with `split.seed`).
    """
    cfg = data_config(data_cfg)
    data, test = hold_out_test(cfg)
    train, valid = split_validation(data, cfg)
    return Splits(train=train, valid=valid, test=test)


def split_validation(data: BankDataset, data_cfg: Mapping[str, Any] | DictConfig) -> tuple[BankDataset, BankDataset]:
    """(train, validation) of one bank's rows, by the data config's `split.valid_fraction` and `split.seed`."""
    split = data_config(data_cfg)["split"]
    train_idx, valid_idx = split_train_valid(np.arange(len(data)), data.labels, split["valid_fraction"], split["seed"])
    return data.subset(train_idx), data.subset(valid_idx)


def hold_out_test(data_cfg: Mapping[str, Any] | DictConfig) -> tuple[BankDataset, BankDataset]:
    """(the rows to train on, the global test set) of one data config."""
    cfg = data_config(data_cfg)
    data = load_dataset(cfg, "train")
    if has_test_file(cfg):
        return data, load_dataset(cfg, "test")
    split = cfg["split"]
    if split["by_time"]:
        kept, held = time_split_indices(data.keys[split["by_time"]], split["test_fraction"])
    else:
        kept, held = split_train_valid(np.arange(len(data)), data.labels, split["test_fraction"], split["seed"])
    return data.subset(kept), data.subset(held)


def table_to_dataset(table: pd.DataFrame, data_cfg: Mapping[str, Any]) -> BankDataset:
    """The records of `table` under a data config, every row validated."""
    cfg = data_config(data_cfg)
    series_cfg = cfg["series"] or {}
    layout = series_cfg.get("layout")
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"data.series.layout must be one of {LAYOUTS} or null, got {layout!r}")
    extra = None
    series: Series | None
    if layout == "windows":
        series, labels, table = window_series(table, series_cfg, cfg["label"])
        class_names = list((cfg["label"].get("classes") or {0: "down", 1: "up"}).values())
    else:
        labels, class_names = labels_from(table, cfg["label"]["column"], cfg["label"]["classes"])
        series, extra = _row_series(table, series_cfg, layout, cfg)
    if series is not None:
        _refuse_overflow(table, series)
    texts = texts_from(table, cfg["text"], extra)
    features = features_from(table, cfg["features"])
    if texts is None and series is None and features is None:
        raise ValueError(f"data config {cfg['name']!r} maps no text, series or features")
    return BankDataset(
        texts=texts,
        series=None if series is None else series.values,
        mask=None if series is None else series.mask,
        labels=labels,
        class_names=class_names,
        feature_names=[] if series is None else series.feature_names,
        keys=_kept_columns(table, _columns_to_keep(cfg)),
        features=features,
    )


def _refuse_overflow(table: pd.DataFrame, series: Series) -> None:
    """Every cell was a float32 number, but a derived one (a time delta, a `first_step` ratio) may not be."""
    overflowed = (~np.isfinite(series.values)).any(axis=(1, 2)).nonzero()[0]
    if len(overflowed):
        path, row = where(table, overflowed[0])
        raise DataError(
            path, "a series value derived from this row (time_delta or series.scale) overflows float32", row=row
        )


def _row_series(
    table: pd.DataFrame, series_cfg: Mapping[str, Any], layout: str | None, cfg: Mapping[str, Any]
) -> tuple[Series | None, pd.DataFrame | None]:
    if layout == "wide":
        return wide_series(table, series_cfg["features"]), None
    if layout == "long":
        return long_series(table, series_cfg, cfg["format"], cfg["encoding"])
    return None, None


def _columns_to_keep(cfg: Mapping[str, Any]) -> list[str]:
    by_time = cfg["split"]["by_time"]
    return list(dict.fromkeys([*cfg["keep_columns"], *([by_time] if by_time else [])]))


def _kept_columns(table: pd.DataFrame, columns: list[str]) -> dict[str, np.ndarray]:
    """Columns kept beside the records, e.g. the segment or ticker that makes a natural bank split."""
    require_columns(table, columns, "keep_columns")
    return {c: table[c].map(canonical).to_numpy() for c in columns}
