"""Split a data set's rows into non-IID "banks" for federated simulations.

Everything works on arrays: the caller passes the label column (and, for natural
splits, a key column) and gets back, per bank, sorted row indices into those arrays.
The actual assignment is delegated to the flwr-datasets partitioners, fed a small
`datasets.Dataset` holding the label/key and the original row number.

Two behaviours of those partitioners are compensated for here:
- `IidPartitioner` and `SizePartitioner` cut the data set into contiguous blocks without
  shuffling, so the data set is shuffled (seeded) first; otherwise a file sorted by
  label or date would give each bank a different slice of it.
- `SizePartitioner` accepts only Python ints, not NumPy integers.

flwr-datasets and `datasets` are imported where a split is made, not with this module: together
they cost 1.6 s of start-up (flwr-datasets loads its plotting stack), and every ServerApp, ClientApp
actor and bank worker imports this module through the data layout without ever splitting.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

METHODS = ("iid", "dirichlet", "quantity", "natural")

_ROW = "row"
_COLUMN = "partition_by"


def partition_indices(
    labels: np.ndarray,
    num_banks: int | None,
    method: str,
    *,
    alpha: float = 0.5,
    keys: np.ndarray | None = None,
    bins: Sequence[float] | None = None,
    min_size: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Assign every row to exactly one bank; return each bank's sorted int64 row indices.

    Methods:
    - "iid": a seeded random split into banks of equal size (within one row).
    - "dirichlet": label skew; each class is divided among the banks by proportions
      drawn from Dirichlet(alpha), so a small alpha gives banks dominated by few classes.
    - "quantity": quantity skew; each bank gets `min_size` rows plus a share of the rest
      drawn from Dirichlet(alpha) over banks; labels are otherwise IID.
    - "natural": the value of `keys` (cut into half-open bands [b_i, b_i+1) by `bins` when
      given) decides the bank; banks are ordered by key value and `num_banks` may be None.

    Every bank gets at least `min_size` rows, or a ValueError says why it cannot.
    """
    labels = _check_labels(labels)
    _check_method(method)
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if method == "natural":
        codes, values = _natural_codes(keys, bins, len(labels))
        _check_natural_count(num_banks, values)
        return _natural(codes, values, min_size)
    num_banks = _check_num_banks(num_banks, len(labels), min_size)
    if alpha <= 0 and method in ("dirichlet", "quantity"):
        raise ValueError(f"alpha must be > 0 for method {method!r}, got {alpha}")
    if method == "iid":
        return _iid(len(labels), num_banks, seed)
    if method == "dirichlet":
        return _dirichlet(labels, num_banks, alpha, min_size, seed)
    return _quantity(len(labels), num_banks, alpha, min_size, seed)


def bank_names(
    method: str,
    num_banks: int | None,
    keys: np.ndarray | None = None,
    bins: Sequence[float] | None = None,
    *,
    key_name: str = "key",
) -> list[str]:
    """Names of the banks, in the order `partition_indices` returns them.

    Natural banks are named after their key value ("EDUCATION=2") or band
    ("AGE in [30, 40)"); all others are "bank_00", "bank_01", ...
    """
    _check_method(method)
    if method == "natural":
        num_rows = 0 if keys is None else len(keys)
        _, values = _natural_codes(keys, bins, num_rows)
        _check_natural_count(num_banks, values)
        separator = " in " if bins is not None else "="
        return [f"{key_name}{separator}{value}" for value in values]
    if num_banks is None or num_banks < 1:
        raise ValueError(f"num_banks must be at least 1, got {num_banks}")
    width = max(2, len(str(num_banks - 1)))
    return [f"bank_{i:0{width}d}" for i in range(num_banks)]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    return labels


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown partition method {method!r}; valid methods: {', '.join(METHODS)}")


def _check_num_banks(num_banks: int | None, num_rows: int, min_size: int) -> int:
    """`num_banks`, checked to be a count of banks that `num_rows` rows can fill."""
    if num_banks is None or num_banks < 1:
        raise ValueError(f"num_banks must be at least 1, got {num_banks}")
    if num_banks > num_rows:
        raise ValueError(f"more banks ({num_banks}) than rows ({num_rows})")
    if num_banks * min_size > num_rows:
        raise ValueError(f"{num_rows} rows cannot give each of {num_banks} banks min_size={min_size} rows")
    return num_banks


def _dataset(column: np.ndarray) -> datasets.Dataset:
    """A data set with the partitioning column and each row's original index."""
    import datasets

    return datasets.Dataset.from_dict({_COLUMN: column, _ROW: np.arange(column.size)})


def _load_all(partitioner: Partitioner, dataset: datasets.Dataset) -> list[np.ndarray]:
    partitioner.dataset = dataset
    return [
        np.sort(partitioner.load_partition(i).with_format("numpy")[_ROW]).astype(np.int64)
        for i in range(partitioner.num_partitions)
    ]


def _iid(num_rows: int, num_banks: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import IidPartitioner

    shuffled = _dataset(np.zeros(num_rows, dtype=np.int8)).shuffle(seed=seed)
    return _load_all(IidPartitioner(num_partitions=num_banks), shuffled)


def _quantity(num_rows: int, num_banks: int, alpha: float, min_size: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import SizePartitioner

    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_banks, float(alpha)))
    sizes = min_size + rng.multinomial(num_rows - num_banks * min_size, shares)
    shuffled = _dataset(np.zeros(num_rows, dtype=np.int8)).shuffle(seed=seed)
    return _load_all(SizePartitioner([int(size) for size in sizes]), shuffled)


def _dirichlet(labels: np.ndarray, num_banks: int, alpha: float, min_size: int, seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner

    partitioner = DirichletPartitioner(
        num_partitions=num_banks,
        partition_by=_COLUMN,
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return _load_all(partitioner, _dataset(labels))
    except ValueError as err:
        raise ValueError(
            f"dirichlet split with alpha={alpha} could not give each of {num_banks} banks "
            f"at least min_size={min_size} rows (a bank would end up too small or empty); "
            "raise alpha, use fewer banks or lower min_size"
        ) from err


def _natural_codes(
    keys: np.ndarray | None, bins: Sequence[float] | None, num_rows: int
) -> tuple[np.ndarray, list[str]]:
    """Map each row's key to a bank number 0..K-1 and return the K value/band names."""
    if keys is None:
        raise ValueError("method 'natural' needs keys: the column whose value decides the bank")
    keys = np.asarray(keys)
    if keys.shape != (num_rows,):
        raise ValueError(f"keys must have one value per row ({num_rows}), got shape {keys.shape}")
    if num_rows == 0:
        raise ValueError("keys must not be empty")
    if pd.isna(keys).any():
        raise ValueError(f"keys contain {int(pd.isna(keys).sum())} missing values")
    if bins is None:
        values, codes = np.unique(keys, return_inverse=True)
        return codes, [str(value) for value in values]
    bands = _band_of(keys, np.asarray(bins, dtype=float))
    present, codes = np.unique(bands, return_inverse=True)
    names = [f"[{bins[band]:g}, {bins[band + 1]:g})" for band in present]
    return codes, names


def _band_of(keys: np.ndarray, bins: np.ndarray) -> np.ndarray:
    if bins.ndim != 1 or bins.size < 2 or np.any(np.diff(bins) <= 0):
        raise ValueError(f"bins must be at least 2 strictly increasing edges, got {bins.tolist()}")
    if not np.issubdtype(keys.dtype, np.number):
        raise ValueError(f"bins need numeric keys, got dtype {keys.dtype}")
    bands = np.searchsorted(bins, keys, side="right") - 1
    outside = (bands < 0) | (bands >= bins.size - 1)
    if outside.any():
        raise ValueError(
            f"{int(outside.sum())} key values lie outside [{bins[0]:g}, {bins[-1]:g}), e.g. {keys[outside][0]}"
        )
    return bands


def _check_natural_count(num_banks: int | None, values: list[str]) -> None:
    if num_banks is not None and num_banks != len(values):
        preview = ", ".join(values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(
            f"natural split has {len(values)} distinct key values ({preview}) "
            f"but num_banks={num_banks}; pass num_banks={len(values)} or None"
        )


def _natural(codes: np.ndarray, values: list[str], min_size: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by=_COLUMN)
    loaded = _load_all(partitioner, _dataset(codes))
    parts = [np.empty(0, dtype=np.int64)] * len(values)
    for partition_id, part in enumerate(loaded):
        parts[partitioner.partition_id_to_natural_id[partition_id]] = part
    small = [f"{values[i]} ({part.size})" for i, part in enumerate(parts) if part.size < min_size]
    if small:
        raise ValueError(
            f"natural banks with fewer than min_size={min_size} rows: {', '.join(small)}; "
            "use coarser bins, merge values by federation.key_map or federation.other_bank, or lower min_size"
        )
    return parts


def merge_key_values(
    keys: np.ndarray, key_map: Mapping[str, str], min_size: int, other_bank: str | None
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Natural-split keys with values renamed by `key_map` (several values to one name merge into one
    bank), then, with `other_bank`, every value still under `min_size` rows renamed `other_bank`.

    Returns the new keys (strings) and, per merged bank name, the values merged into it, so that the
    caller can say which (a merge is never silent). Values are compared as text: 9, 9.0 and "9" match.
    """
    names = np.array([str(value) for value in np.asarray(keys, dtype=object)], dtype=object)
    merged: dict[str, set[str]] = {}
    for value, name in key_map.items():
        hit = names == str(value)
        if hit.any() and str(value) != str(name):
            names[hit] = str(name)
            merged.setdefault(str(name), set()).add(str(value))
    if other_bank is not None:
        values, counts = np.unique(names, return_counts=True)
        small = [str(v) for v, c in zip(values, counts, strict=True) if c < min_size and v != other_bank]
        if small:
            names[np.isin(names, small)] = other_bank
            merged.setdefault(other_bank, set()).update(small)
    return names.astype(str), {name: sorted(values) for name, values in merged.items()}
