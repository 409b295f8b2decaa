"""Deterministic splits of a data set's rows: label-stratified at random, or by time."""

from __future__ import annotations

import numpy as np


def split_train_valid(
    indices: np.ndarray, labels: np.ndarray, valid_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one bank's row indices into sorted (train, valid) index arrays.

    The validation set holds round(valid_fraction * n) rows, capped so that at least one
    row is left for training. It is stratified by label when every class in the bank has
    at least 2 rows, else drawn at random. A stratified split keeps at least one training
    row per class, even if the validation set then comes out a row or two smaller.
    """
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("cannot split an empty bank: it needs at least one train row")
    num_valid = min(int(np.floor(valid_fraction * indices.size + 0.5)), indices.size - 1)
    rng = np.random.default_rng(seed)
    _, class_of_row, class_sizes = np.unique(np.asarray(labels)[indices], return_inverse=True, return_counts=True)
    if class_sizes.min() >= 2:
        valid_positions = _stratified_positions(class_of_row, class_sizes, num_valid, rng)
    else:
        valid_positions = rng.permutation(indices.size)[:num_valid]
    is_valid = np.zeros(indices.size, dtype=bool)
    is_valid[valid_positions] = True
    return np.sort(indices[~is_valid]), np.sort(indices[is_valid])


def _stratified_positions(
    class_of_row: np.ndarray, class_sizes: np.ndarray, num_valid: int, rng: np.random.Generator
) -> np.ndarray:
    """Pick `num_valid` positions, each class contributing its share (largest remainder)."""
    quota = num_valid * class_sizes / class_sizes.sum()
    take = np.floor(quota).astype(np.int64)
    by_remainder = np.lexsort((rng.random(class_sizes.size), take - quota))
    missing = num_valid - int(take.sum())
    for cls in by_remainder:
        if missing == 0:
            break
        if take[cls] < class_sizes[cls] - 1:
            take[cls] += 1
            missing -= 1
    picked = [rng.permutation(np.flatnonzero(class_of_row == cls))[:count] for cls, count in enumerate(take)]
    return np.concatenate(picked)


def time_split_indices(times: np.ndarray, held_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(earlier, latest) row indices: rows at or after the time that leaves `held_fraction` behind it.

    Overlapping windows of one history would leak across a random split; a cut in time does not.
    Rows sharing the cut time (windows of several tickers ending the same day) all go to the later side.
    """
    if not 0.0 <= held_fraction < 1.0:
        raise ValueError(f"a held-out fraction must be in [0, 1), got {held_fraction}")
    times = np.asarray(times)
    n_held = int(round(held_fraction * len(times)))
    if n_held == 0:
        return np.arange(len(times)), np.arange(0)
    cut = np.sort(times, kind="stable")[len(times) - n_held]
    later = times >= cut
    return np.flatnonzero(~later), np.flatnonzero(later)
