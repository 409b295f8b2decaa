"""Numeric sequences (time steps x features) from a table, in the three layouts banks have.

- wide: one row per record, one column per (feature, time step), e.g. PAY_6..PAY_0;
- long: a separate event table keyed by an id (transactions, repayments), one row per event;
- windows: one long price or metric history per group, cut into fixed-length windows whose label
  is the direction of a column `horizon` steps after the window.
Padding is at the end of a sequence; the mask is True on real steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fingpt_federated.data.columns import canonical, numeric, require_columns
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.tables import read_table


@dataclass
class Series:
    values: np.ndarray  # float32 (N, T, F)
    mask: np.ndarray  # bool (N, T)
    feature_names: list[str]


def wide_series(table: pd.DataFrame, features: Mapping[str, list[str]]) -> Series:
    """Each feature lists its columns from the oldest to the newest step; all features equally long."""
    lengths = {name: len(cols) for name, cols in features.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"series.features must list as many columns for every feature, got {lengths}")
    require_columns(table, [c for cols in features.values() for c in cols], "series")
    steps = [np.stack([numeric(table, c) for c in cols], axis=1) for cols in features.values()]
    values = np.stack(steps, axis=2).astype(np.float32)
    return Series(values, np.ones(values.shape[:2], dtype=bool), list(features))


def long_series(
    table: pd.DataFrame, cfg: Mapping[str, Any], fmt: str | None, encoding: str
) -> tuple[Series, pd.DataFrame]:
    """Events of each record's key, oldest first, the last `max_steps` kept; plus per-record statistics.

    A record with no event (an inactive account) gets an empty sequence (mask all False) and zero
    statistics.
    An event belongs to a record when any of `id_columns` equals the record's `key`; with several id
    columns a 0/1 feature per column says which role the record played (e.g. sender or receiver).
    """
    key = cfg["key"]
    require_columns(table, [key], "series.key")
    events = _events(cfg, fmt, encoding)
    keys = table[key].map(canonical)
    feature_names = [c for c in events.columns if not c.startswith("_")]
    series = _pack(events, keys, feature_names, int(cfg.get("max_steps") or 64))
    return series, _event_statistics(events, keys, cfg)


def _events(cfg: Mapping[str, Any], fmt: str | None, encoding: str) -> pd.DataFrame:
    """The event table in long form: one row per (record key, event), numeric features only."""
    raw = read_table(cfg["path"], fmt, encoding, cfg.get("table"), "data.series.table")
    id_columns, time_column = list(cfg["id_columns"]), cfg["time_column"]
    value_columns = list(cfg.get("value_columns") or [])
    require_columns(raw, id_columns + [time_column] + value_columns, "series")
    numbers = {c: numeric(raw, c) for c in [time_column] + value_columns}
    parts = []
    for id_column in id_columns:
        part = pd.DataFrame({"_key": raw[id_column].map(canonical), "_time": numbers[time_column]})
        for c in value_columns:
            part[c] = numbers[c]
        if len(id_columns) > 1:
            for role in id_columns:
                part[f"as_{role}"] = float(role == id_column)
        parts.append(part)
    events = pd.concat(parts, ignore_index=True)
    if cfg.get("time_delta", True):
        events = events.sort_values(["_key", "_time"], kind="stable")
        events["time_delta"] = events.groupby("_key")["_time"].diff().fillna(0.0)
    return events.sort_values(["_key", "_time"], kind="stable")


def _pack(events: pd.DataFrame, keys: pd.Series, feature_names: list[str], max_steps: int) -> Series:
    """Scatter the last `max_steps` events of every key into a padded (N, T, F) array."""
    from_end = events.groupby("_key").cumcount(ascending=False).to_numpy()
    kept = events[from_end < max_steps]
    step = kept.groupby("_key").cumcount().to_numpy()
    row_of_key = pd.Series(np.arange(len(keys)), index=keys.to_numpy())
    if row_of_key.index.has_duplicates:
        dup = row_of_key.index[row_of_key.index.duplicated()][0]
        raise DataError("series.key", f"key {dup!r} appears in more than one row; keys must be unique")
    rows = row_of_key.reindex(kept["_key"].to_numpy()).to_numpy()
    present = ~np.isnan(rows)
    rows, step = rows[present].astype(np.int64), step[present]
    values = np.zeros((len(keys), max_steps, len(feature_names)), dtype=np.float32)
    mask = np.zeros((len(keys), max_steps), dtype=bool)
    values[rows, step] = kept[feature_names].to_numpy(dtype=np.float32)[present]
    mask[rows, step] = True
    return Series(values, mask, feature_names)


def _event_statistics(events: pd.DataFrame, keys: pd.Series, cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Counts, sums, means and extremes per key: the facts a narrative text template may quote."""
    grouped = events.groupby("_key")
    stats = pd.DataFrame({"n_events": grouped.size(), "span": grouped["_time"].max() - grouped["_time"].min()})
    for role in cfg["id_columns"] if len(cfg["id_columns"]) > 1 else []:
        stats[f"n_as_{role}"] = grouped[f"as_{role}"].sum().astype(int)
    for column in cfg.get("value_columns") or []:
        for how in ("sum", "mean", "max", "min"):
            stats[f"{how}_{column}"] = grouped[column].agg(how)
    stats = stats.reindex(keys.to_numpy()).fillna(0)
    counts = [c for c in stats.columns if c.startswith("n_")]
    return stats.astype({c: int for c in counts})


def window_series(
    table: pd.DataFrame, cfg: Mapping[str, Any], label_cfg: Mapping[str, Any]
) -> tuple[Series, np.ndarray, pd.DataFrame]:
    """Fixed-length windows over each group's history and the up/down label `horizon` steps ahead.

    With `scale: first_step` each feature is expressed relative to its value at the window's first
    step (x / x0 - 1), so that windows of instruments at very different price levels compare.
    Returns the windows, their labels (0 = down or flat, 1 = up) and the table row ending each window.
    """
    group, time_column, features = cfg["group_column"], cfg["time_column"], list(cfg["features"])
    future = label_cfg["future"]
    require_columns(table, [group, time_column, future["column"]] + features, "series")
    length, stride, horizon = int(cfg["length"]), int(cfg.get("stride") or 1), int(future["horizon"])
    numbers = np.stack([numeric(table, c) for c in features], axis=1)
    target = numeric(table, future["column"])
    ordered = table.assign(_pos=np.arange(len(table))).sort_values([group, time_column], kind="stable")
    windows, labels, ends = [], [], []
    for _, rows in ordered.groupby(group, sort=True):
        pos = rows["_pos"].to_numpy()
        for end in range(length - 1, len(pos) - horizon, stride):
            span = pos[end - length + 1 : end + 1]
            windows.append(_scaled(numbers[span], cfg.get("scale")))
            labels.append(int(target[pos[end + horizon]] > target[pos[end]]))
            ends.append(pos[end])
    if not windows:
        raise DataError(table["_source"].iat[0], f"no group has more than length + horizon = {length + horizon} rows")
    with np.errstate(over="ignore"):  # a scaled value beyond float32 becomes inf: refused by row in loading
        values = np.stack(windows).astype(np.float32)
    return Series(values, np.ones(values.shape[:2], dtype=bool), features), np.array(labels), table.iloc[ends]


def _scaled(window: np.ndarray, scale: str | None) -> np.ndarray:
    if scale in (None, "none"):
        return window
    if scale == "first_step":
        first = np.where(window[0] == 0, 1.0, window[0])
        return window / first - 1.0
    raise ValueError(f"series.scale must be 'first_step' or 'none', got {scale!r}")
