"""Static features of a record (amount, duration, age; purpose, housing): read, checked and carried raw.

`features:` in a data config names numeric and categorical columns. A numeric cell must be a finite
float32 number; a categorical cell any non-empty value, compared as text (1, 1.0 and "1" are one
value). Each categorical value is carried as a stable 63-bit hash of its text, so every bank, the
server and the published model turn the same value into the same number without sharing a list.

Nothing here is fitted: the model's feature encoder (model/features.py) standardises the numbers
and builds its vocabulary from a bank's training rows, so the statistics and vocabulary live
with the weights (saved and published with them) and never see validation or test rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fingpt_federated.data.columns import canonical, numeric, require_columns, where
from fingpt_federated.data.errors import DataError


@dataclass
class Features:
    """`features:` of a data config: numeric and categorical columns used as they are (no text, no steps)."""

    numeric: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [*self.numeric, *self.categorical]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"features: {repeated} listed more than once (a column is numeric or categorical)")
        if not names:
            raise ValueError("features: needs at least one numeric or categorical column (or leave it out)")


@dataclass
class StaticFeatures:
    """Raw static features of N records: float32 numbers (N, Fn) and int64 category hashes (N, Fc)."""

    numeric: np.ndarray
    categorical: np.ndarray
    numeric_names: list[str]
    categorical_names: list[str]

    def __post_init__(self) -> None:
        self.numeric = np.asarray(self.numeric, dtype=np.float32).reshape(-1, len(self.numeric_names))
        self.categorical = np.asarray(self.categorical, dtype=np.int64).reshape(-1, len(self.categorical_names))
        if len(self.numeric) != len(self.categorical):
            raise ValueError(f"{len(self.numeric)} numeric rows for {len(self.categorical)} categorical rows")

    def __len__(self) -> int:
        return len(self.numeric)

    @property
    def names(self) -> list[str]:
        """Every feature, numeric first: the order of the model's feature tokens."""
        return [*self.numeric_names, *self.categorical_names]

    def subset(self, idx: np.ndarray) -> StaticFeatures:
        return StaticFeatures(self.numeric[idx], self.categorical[idx], self.numeric_names, self.categorical_names)


def category_hash(value: object) -> int:
    """A category's number: the first 63 bits of sha256 of its canonical text, never 0 (0 = an empty slot)."""
    digest = hashlib.sha256(canonical(value).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1


def features_from(table: pd.DataFrame, features: Features | dict | None) -> StaticFeatures | None:
    """The static features of every row; a bad cell is a DataError at its file, row and column."""
    if features is None:
        return None
    cfg = features if isinstance(features, Features) else Features(**features)
    require_columns(table, [*cfg.numeric, *cfg.categorical], "features")
    numbers = [numeric(table, column) for column in cfg.numeric]
    hashes = [_categories(table, column) for column in cfg.categorical]
    n = len(table)
    return StaticFeatures(
        np.stack(numbers, axis=1) if numbers else np.zeros((n, 0)),
        np.stack(hashes, axis=1) if hashes else np.zeros((n, 0), dtype=np.int64),
        list(cfg.numeric),
        list(cfg.categorical),
    )


def _categories(table: pd.DataFrame, column: str) -> np.ndarray:
    texts = table[column].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else canonical(v))
    empty = (texts == "").to_numpy().nonzero()[0]
    if len(empty):
        path, row = where(table, empty[0])
        raise DataError(path, "empty value (a categorical feature needs a value)", row=row, column=column)
    return np.array([category_hash(text) for text in texts], dtype=np.int64)


def hashes_of(values: Sequence[object]) -> np.ndarray:
    """Category hashes of raw values (inference: a record's categorical fields)."""
    return np.array([category_hash(value) for value in values], dtype=np.int64)
