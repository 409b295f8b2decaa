"""Partitioners that split rows into non-IID banks, and the per-bank report."""

from __future__ import annotations

import csv
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from fingpt_federated.data.partitioning import bank_names, partition_indices
from fingpt_federated.simulations.partition_report import (
    label_counts,
    render_table,
    save_heatmap,
    write_csv,
)

NUM_ROWS = 2000
NUM_CLASSES = 5
CLASS_NAMES = [f"class_{i}" for i in range(NUM_CLASSES)]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Labels sorted by class, as in a file ordered by outcome: a split that forgets to
    shuffle before cutting contiguous blocks shows up as label skew."""
    rng = np.random.default_rng(7)
    return np.sort(rng.choice(NUM_CLASSES, size=NUM_ROWS, p=[0.4, 0.25, 0.15, 0.12, 0.08]))


@pytest.fixture(scope="module")
def segments() -> np.ndarray:
    return np.random.default_rng(8).choice([3, 1, 2, 4], size=NUM_ROWS)


def mean_tv_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each bank's label mix and the global one."""
    counts = label_counts(labels, parts, NUM_CLASSES)
    global_mix = np.bincount(labels, minlength=NUM_CLASSES) / labels.size
    bank_mix = counts / counts.sum(axis=1, keepdims=True)
    return float(np.mean(0.5 * np.abs(bank_mix - global_mix).sum(axis=1)))


def split(labels: np.ndarray, method: str, segments: np.ndarray, **kwargs) -> list[np.ndarray]:
    if method == "natural":
        return partition_indices(labels, None, "natural", keys=segments, **kwargs)
    return partition_indices(labels, 10, method, **kwargs)


def same_split(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity", "natural"])
def test_every_row_lands_in_exactly_one_bank(labels, segments, method):
    parts = split(labels, method, segments)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(NUM_ROWS))
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)
        assert part.size >= 2


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity"])
def test_split_is_fixed_by_seed(labels, segments, method):
    first = split(labels, method, segments, seed=3)
    assert same_split(first, split(labels, method, segments, seed=3))
    assert not same_split(first, split(labels, method, segments, seed=4))


def test_iid_banks_have_equal_size_and_the_global_label_mix(labels):
    parts = partition_indices(labels, 10, "iid")
    assert {part.size for part in parts} == {NUM_ROWS // 10}
    assert mean_tv_distance(labels, parts) < 0.06


def test_small_alpha_gives_much_more_label_skew_than_iid(labels):
    iid = mean_tv_distance(labels, partition_indices(labels, 10, "iid"))
    skewed = mean_tv_distance(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1))
    mild = mean_tv_distance(labels, partition_indices(labels, 10, "dirichlet", alpha=100.0))
    assert skewed > 0.4
    assert skewed > 5 * iid
    assert mild < 0.1


def test_quantity_skew_gives_unequal_sizes_with_iid_labels(labels):
    parts = partition_indices(labels, 10, "quantity", alpha=0.5, min_size=5)
    sizes = np.array([part.size for part in parts])
    assert sizes.min() >= 5
    assert sizes.max() > 4 * sizes.min()
    large = [part for part in parts if part.size >= 150]
    assert len(large) >= 3
    assert mean_tv_distance(labels, large) < 0.1


def test_natural_puts_each_key_value_in_exactly_one_bank(labels, segments):
    parts = partition_indices(labels, 4, "natural", keys=segments)
    assert [np.unique(segments[part]).tolist() for part in parts] == [[1], [2], [3], [4]]
    assert [part.size for part in parts] == [int(np.sum(segments == v)) for v in (1, 2, 3, 4)]
    assert bank_names("natural", 4, segments, key_name="EDUCATION") == [
        "EDUCATION=1",
        "EDUCATION=2",
        "EDUCATION=3",
        "EDUCATION=4",
    ]


def test_natural_bins_cut_a_numeric_key_into_bands(labels):
    ages = np.random.default_rng(9).integers(18, 50, size=NUM_ROWS)
    bins = [0, 30, 40, 50, 200]
    parts = partition_indices(labels, None, "natural", keys=ages, bins=bins)
    assert len(parts) == 3
    for part, (low, high) in zip(parts, [(0, 30), (30, 40), (40, 50)], strict=True):
        assert np.all((ages[part] >= low) & (ages[part] < high))
        assert part.size == np.sum((ages >= low) & (ages < high))
    assert bank_names("natural", None, ages, bins, key_name="AGE") == [
        "AGE in [0, 30)",
        "AGE in [30, 40)",
        "AGE in [40, 50)",
    ]


def test_other_methods_name_banks_in_order():
    assert bank_names("iid", 3) == ["bank_00", "bank_01", "bank_02"]
    assert bank_names("dirichlet", 101)[-1] == "bank_100"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_banks": 3, "method": "random"}, "valid methods: iid, dirichlet, quantity"),
        ({"num_banks": 0, "method": "iid"}, "at least 1"),
        ({"num_banks": NUM_ROWS + 1, "method": "iid"}, "more banks"),
        ({"num_banks": 1500, "method": "iid"}, "min_size=2"),
        ({"num_banks": 3, "method": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        ({"num_banks": 3, "method": "quantity", "alpha": -1.0}, "alpha must be > 0"),
        ({"num_banks": 3, "method": "natural"}, "needs keys"),
        ({"num_banks": 3, "method": "natural", "keys": np.arange(NUM_ROWS) % 4}, "4 distinct"),
        ({"num_banks": None, "method": "natural", "keys": np.arange(NUM_ROWS) % 4, "bins": [0, 2]}, "outside [0, 2)"),
        ({"num_banks": None, "method": "natural", "keys": np.r_[np.zeros(NUM_ROWS - 1), 7]}, "7.0 (1)"),
        ({"num_banks": None, "method": "natural", "keys": np.r_[np.nan, np.ones(NUM_ROWS - 1)]}, "missing"),
    ],
)
def test_bad_requests_are_refused_with_a_clear_error(labels, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        partition_indices(labels, **kwargs)


def test_dirichlet_that_would_leave_a_bank_empty_is_refused():
    two_classes = np.repeat([0, 1], 20)
    with pytest.raises(ValueError, match="too small or empty"):
        partition_indices(two_classes, 15, "dirichlet", alpha=0.01, min_size=2)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_heatmap_is_a_png_that_grows_with_the_number_of_banks(labels, tmp_path):
    few = partition_indices(labels, 5, "dirichlet", alpha=0.3)
    many = partition_indices(labels, 100, "iid", min_size=5)
    small = save_heatmap(
        label_counts(labels, few, NUM_CLASSES), bank_names("dirichlet", 5), CLASS_NAMES, tmp_path / "few.png", "5 banks"
    )
    large = save_heatmap(
        label_counts(labels, many, NUM_CLASSES),
        bank_names("iid", 100),
        CLASS_NAMES,
        tmp_path / "sub" / "many.png",
        "100 banks",
    )
    assert small.stat().st_size > 5_000
    assert png_size(large)[1] > 3 * png_size(small)[1]


def test_table_and_csv_totals_match_the_data(labels, tmp_path):
    parts = partition_indices(labels, 6, "quantity", alpha=1.0)
    counts = label_counts(labels, parts, NUM_CLASSES)
    names = bank_names("quantity", 6)
    table = render_table(counts, names, CLASS_NAMES)
    columns = {column.header: list(column.cells) for column in table.columns}
    assert columns["bank"] == names + ["total"]
    assert columns["rows"] == [str(p.size) for p in parts] + [str(NUM_ROWS)]
    assert columns["share"][-1] == "100.0%"
    for cls, name in enumerate(CLASS_NAMES):
        assert columns[name][-1].startswith(f"{np.sum(labels == cls)} (")
    rows = list(csv.DictReader(write_csv(counts, names, CLASS_NAMES, tmp_path / "c.csv").open()))
    assert [int(r["rows"]) for r in rows] == [p.size for p in parts]
    assert int(rows[0]["count_class_0"]) == np.sum(labels[parts[0]] == 0)


@pytest.mark.parametrize("module", ["fingpt_federated.server.app", "fingpt_federated.client.worker_task"])
def test_processes_that_never_split_do_not_load_the_partitioning_libraries(module):
    """flwr-datasets (with its plotting stack) and `datasets` cost 1.6 s of every ServerApp, Ray actor and
    bank worker start; they are needed only where a data set is split into banks."""
    heavy = "('flwr_datasets', 'datasets', 'seaborn')"
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
