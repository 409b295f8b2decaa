"""Per-bank report of a partition: label counts as a table, a heat-map and a CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

ANNOTATE_MAX_BANKS = 30


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Rows per (bank, class) as an int64 array of shape (banks, classes)."""
    labels = np.asarray(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    rows = [np.bincount(labels[part], minlength=num_classes) for part in parts]
    return np.array(rows, dtype=np.int64).reshape(len(parts), num_classes)


def render_table(
    counts: np.ndarray,
    bank_names: Sequence[str],
    class_names: Sequence[str],
    title: str = "Label distribution per bank",
) -> Table:
    """A rich table: per bank its size, share of all rows and count (%) per class."""
    counts = _checked(counts, bank_names, class_names)
    total = int(counts.sum())
    table = Table(title=title)
    table.add_column("bank")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    for name in class_names:
        table.add_column(str(name), justify="right")
    for name, row in zip(bank_names, counts, strict=True):
        table.add_row(str(name), *_row_cells(row, total))
    table.add_section()
    table.add_row("total", *_row_cells(counts.sum(axis=0), total), style="bold")
    return table


def save_heatmap(
    counts: np.ndarray,
    bank_names: Sequence[str],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "Label distribution per bank",
) -> Path:
    """Write a PNG heat-map: one row per bank, cell colour = class share of the bank's rows.

    The figure grows with the number of banks so that ~100 bank names stay legible;
    cells carry their row count only while there are few enough banks to read them.
    """
    counts = _checked(counts, bank_names, class_names)
    num_banks, num_classes = counts.shape
    figure = Figure(
        figsize=(max(5.0, 3.0 + 0.8 * num_classes), max(3.0, 1.5 + 0.22 * num_banks)),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    shares = _row_shares(counts)
    image = axes.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(num_classes), labels=[str(n) for n in class_names], rotation=30)
    axes.set_yticks(range(num_banks), labels=[str(n) for n in bank_names], fontsize=8 if num_banks > 40 else 10)
    axes.set_xlabel("class")
    axes.set_ylabel("bank")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="share of the bank's rows")
    if num_banks <= ANNOTATE_MAX_BANKS:
        _annotate(axes, counts, shares)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def write_csv(
    counts: np.ndarray,
    bank_names: Sequence[str],
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """One line per bank: rows, share of all rows, then count and share of each class."""
    counts = _checked(counts, bank_names, class_names)
    total = counts.sum()
    shares = _row_shares(counts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["bank", "rows", "share"]
            + [f"count_{name}" for name in class_names]
            + [f"share_{name}" for name in class_names]
        )
        for name, row, share in zip(bank_names, counts, shares, strict=True):
            bank_share = row.sum() / total if total else 0.0
            writer.writerow(
                [name, int(row.sum()), f"{bank_share:.6f}"]
                + [int(count) for count in row]
                + [f"{value:.6f}" for value in share]
            )
    return path


def _checked(counts: np.ndarray, bank_names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape != (len(bank_names), len(class_names)):
        raise ValueError(
            f"counts of shape {counts.shape} do not match {len(bank_names)} bank names x {len(class_names)} class names"
        )
    return counts


def _row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum; an empty row stays all zeros."""
    sizes = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sizes, out=np.zeros(counts.shape), where=sizes > 0)


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _row_cells(row: np.ndarray, total: int) -> list[str]:
    size = int(row.sum())
    cells = [str(size), _percent(size, total)]
    return cells + [f"{int(count)} ({_percent(int(count), size)})" for count in row]


def _annotate(axes: Axes, counts: np.ndarray, shares: np.ndarray) -> None:
    """Write each cell's count, dark on light cells and light on dark ones."""
    for (bank, cls), count in np.ndenumerate(counts):
        colour = "black" if shares[bank, cls] > 0.6 else "white"
        axes.text(cls, bank, str(count), ha="center", va="center", color=colour, fontsize=8)
