"""The schema of a data config (`conf/data/*.yaml`, or a bank's own data file) and its only defaults.

A data config maps one table onto records: which file, which column is the text (or a template
over several), which the label, and how numeric sequences are laid out. conf/schema.py registers
`DataConfig` as the `data` group's schema, so an unknown key (a typo, or an option this code does
not have) fails when the config is composed; `data_config` applies the same schema to a file a
bank loads itself. A new option is one field here, with its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_args, get_type_hints

from omegaconf import MISSING

from fingpt_federated.data.errors import DataConfigError
from fingpt_federated.data.features import Features
from fingpt_federated.structured_config import checked_dict


@dataclass
class SyntheticData:
    """Generated instead of read (data/synthetic.py): the tables are written into the run folder."""

    task: str = MISSING  # news | credit | transactions | news_plain (data/synthetic.py: TASKS)
    num_banks: int = MISSING
    rows_per_bank: int = MISSING
    seed: int = 0


@dataclass
class Files:
    train: str | None = None  # None with `synthetic`: filled in with the generated file
    test: str | None = None  # None: split.test_fraction of the train rows is the global test set


@dataclass
class TableOptions:
    """How a delimited text file (`format: csv`, or a .csv file) is read; data/tables.py applies them.

    `delimiter`: one character, or `whitespace` (runs of spaces and tabs). `header`: the first line
    (after `skip_rows`) names the columns; without one `columns` is required; with one, `columns`
    renames them. `quote`: the quote character, or null for none. `comment`: lines starting with it
    are skipped. `skip_rows`: lines skipped at the top of the file, before the header.
    """

    delimiter: str = ","
    header: bool = True
    columns: list[str] | None = None
    quote: str | None = '"'
    comment: str | None = None
    skip_rows: int = 0


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
    `value_columns`, the time since the previous event (`time_delta`), the latest `max_steps` kept;
    the events file is read under its own `table:` options (a layout of its own, not `data.table`'s).
    windows: `features` (a list) of each `group_column` group ordered by `time_column`, windows of
    `length` steps every `stride`, `scale: first_step` for values relative to the window's first step.
    """

    layout: str = MISSING  # wide | long | windows
    features: Any = None
    path: str | None = None
    table: TableOptions = field(default_factory=TableOptions)
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
    table: TableOptions = field(default_factory=TableOptions)
    files: Files = field(default_factory=Files)
    text: Text = field(default_factory=Text)
    label: Label = field(default_factory=Label)
    series: Series | None = None
    features: Features | None = None  # static numeric / categorical columns (data/features.py)
    keep_columns: list[str] = field(default_factory=list)  # kept beside the records, e.g. a natural bank key
    split: Split = field(default_factory=Split)


def data_config(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A data config over the defaults, checked against the schema, resolved, as a plain dict.

    An unknown key (`sep:` instead of `table.delimiter:`) or a wrong type is a DataConfigError naming
    the key, so every command reports it in one line as it does bad data.
    """
    try:
        return checked_dict(DataConfig, cfg, "data")
    except ValueError as error:
        key, _, reason = str(error).partition(": ")
        if reason.startswith("Key ") and " not in " in reason:
            reason = f"unknown key; {key.rpartition('.')[0] or 'data'} takes {', '.join(_known_keys(key))}"
        raise DataConfigError(key, reason) from None


def _known_keys(key: str) -> list[str]:
    """The keys the schema has beside an unknown `key` (e.g. data.table.sep: those of TableOptions)."""
    node: Any = DataConfig
    for part in key.split(".")[1:-1]:
        hint = get_type_hints(node).get(part)
        node = next((t for t in (hint, *get_args(hint)) if is_dataclass(t)), None)
        if node is None:
            return []
    return [f.name for f in fields(node)]
