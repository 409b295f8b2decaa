"""The one record type of a bank's data, and the column-wise data set that holds many of them.

A record may carry text, a numeric sequence (time steps x features), static features (numeric and
categorical, data/features.py) or any mix of them, plus a label.
Sequences of different lengths are padded at the end and carry a boolean mask (True = real step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fingpt_federated.data.features import StaticFeatures


@dataclass(frozen=True)
class Record:
    """One example: optional text, optional series (T x F) with its step mask, optional static features, a class."""

    text: str | None
    series: np.ndarray | None
    mask: np.ndarray | None
    label: int
    numeric: np.ndarray | None = None  # (Fn,) float32 raw values
    categorical: np.ndarray | None = None  # (Fc,) int64 category hashes


@dataclass
class BankDataset:
    """Column-wise storage of records, cheap to index and split.

    `series` is float32 (N, T, F), `mask` bool (N, T); both are None for text-only data.
    `keys` keeps extra table columns (e.g. a customer segment) for natural-key partitioning.
    `features` holds the static numeric and categorical features, None when the config has none.
    """

    texts: list[str] | None
    series: np.ndarray | None
    mask: np.ndarray | None
    labels: np.ndarray
    class_names: list[str]
    feature_names: list[str] = field(default_factory=list)
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    features: StaticFeatures | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.texts is None and self.series is None and self.features is None:
            raise ValueError("a data set needs text, a series or static features")
        if self.features is not None and len(self.features) != n:
            raise ValueError(f"{len(self.features)} rows of static features for {n} labels")
        if self.texts is not None and len(self.texts) != n:
            raise ValueError(f"{len(self.texts)} texts for {n} labels")
        if self.series is not None:
            if self.series.ndim != 3 or len(self.series) != n:
                raise ValueError(f"series must be (N={n}, T, F), got {self.series.shape}")
            if self.mask is None or self.mask.shape != self.series.shape[:2]:
                raise ValueError("series needs a (N, T) mask")
        for name, values in self.keys.items():
            if len(values) != n:
                raise ValueError(f"key column {name!r} has {len(values)} values for {n} rows")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Record:
        return Record(
            text=None if self.texts is None else self.texts[i],
            series=None if self.series is None else self.series[i],
            mask=None if self.mask is None else self.mask[i],
            label=int(self.labels[i]),
            numeric=None if self.features is None else self.features.numeric[i],
            categorical=None if self.features is None else self.features.categorical[i],
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_features(self) -> int:
        return 0 if self.series is None else int(self.series.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray) -> BankDataset:
        """The rows at `indices`, in that order, as a new data set sharing class and feature names."""
        idx = np.asarray(indices, dtype=np.int64)
        return BankDataset(
            texts=None if self.texts is None else [self.texts[i] for i in idx],
            series=None if self.series is None else self.series[idx],
            mask=None if self.mask is None else self.mask[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            feature_names=list(self.feature_names),
            keys={name: values[idx] for name, values in self.keys.items()},
            features=None if self.features is None else self.features.subset(idx),
        )

    def label_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)
