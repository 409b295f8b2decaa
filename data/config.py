"""The schema of a data config (`conf/data/*.yaml`, or a bank's own data file) and its only defaults.

A data config maps one table onto records: which file, which column is the text (or a template
over several), which the label, and how numeric sequences are laid out. conf/schema.py registers
`DataConfig` as the `data` group's schema, so an unknown key (a typo, or an option this code does
not have) fails when the config is composed; `data_config` applies the same schema to a file a
bank loads itself. A new option is one field here, with its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from fingpt_federated.structured_config import checked_dict


@dataclass
class SyntheticData:
    """Generated instead of read (data/synthetic.py): the tables are written into the run folder."""

    task: str = MISSING  # news | credit | transactions
    num_banks: int = MISSING
    rows_per_bank: int = MISSING
    seed: int = 0


@dataclass
class Files:
    train: str | None = None  # None with `synthetic`: filled in with the generated file
    test: str | None = None  # None: split.test_fraction of the train rows is the global test set


@dataclass
class Text:
    """The text of a record: one column, or a template over columns (`{AGE}`, `{LIMIT_BAL:.0f}`)."""

    column: str | None = None
    template: str | None = None
    value_maps: dict[str, Any] = field(default_factory=dict)  # column -> {raw value: words} for the template


@dataclass
class FutureLabel:
    """windows layout: the label is whether `column` is higher `horizon` steps after the window."""

    column: str = MISSING
    horizon: int = MISSING


@dataclass
class Label:
    column: str | None = None
    classes: Any = None  # a list of names, or {raw value: name}
    future: FutureLabel | None = None


@dataclass
class Series:
    """Numeric sequences: `wide` (columns per step), `long` (an event table) or `windows` (over a time series).

    wide: `features` maps each feature to its columns, oldest first. long: events of `path` keyed by
    `key` through `id_columns` (one 0/1 role feature each when several), ordered by `time_column`, with
    `value_columns`, the time since the previous event (`time_delta`), the latest `max_steps` kept.
    windows: `features` (a list) of each `group_column` group ordered by `time_column`, windows of
    `length` steps every `stride`, `scale: first_step` for values relative to the window's first step.
    """

    layout: str = MISSING  # wide | long | windows
    features: Any = None
    path: str | None = None
    key: str | None = None
    id_columns: list[str] = field(default_factory=list)
    time_column: str | None = None
    value_columns: list[str] = field(default_factory=list)
    time_delta: bool = True
    max_steps: int = 64
    group_column: str | None = None
    length: int | None = None
    stride: int = 1
    scale: str | None = None


@dataclass
class Split:
    test_fraction: float = 0.2
    valid_fraction: float = 0.15
    seed: int = 0
    by_time: str | None = None  # test = the latest rows by this column, not a random draw


@dataclass
class DataConfig:
    name: str | None = None
    synthetic: SyntheticData | None = None
    format: str | None = None  # csv | parquet | jsonl; None = from the file suffix
    encoding: str = "utf-8"
    files: Files = field(default_factory=Files)
    text: Text = field(default_factory=Text)
    label: Label = field(default_factory=Label)
    series: Series | None = None
    keep_columns: list[str] = field(default_factory=list)  # kept beside the records, e.g. a natural bank key
    split: Split = field(default_factory=Split)


def data_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A data config over the defaults, checked against the schema, resolved, as a plain dict."""
    return checked_dict(DataConfig, cfg, "data")
