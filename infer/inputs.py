"""What fingpt-infer predicts on: a table read with the model's own data config, or request records.

A prediction file is read exactly as a training file (data/tables, data/loading: the same
columns, templates and series layout, and the same file/row/column errors), except that the
label column may be absent. Request records carry the model's inputs directly: `text` (what the
data config's column or template gives), `series` (steps x features, oldest first) and/or
`features` (static features by name: numbers for numeric ones, any value for categorical ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fingpt_federated.data.columns import FLOAT32_MAX, class_mapping
from fingpt_federated.data.features import StaticFeatures, hashes_of
from fingpt_federated.data.loading import table_to_dataset
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.tables import read_table


@dataclass
class InputTable:
    data: BankDataset
    refs: list[dict[str, Any]]
    """Where each record came from: file and row (counted from 1), or its index when records are windows."""
    labelled: bool


def expects_text(manifest: Mapping[str, Any]) -> bool:
    text = (manifest.get("data") or {}).get("text") or {}
    return bool(text.get("column") or text.get("template")) or not manifest.get("data")


def read_inputs(path: str | Path, manifest: Mapping[str, Any]) -> InputTable:
    """Records of an input file (CSV, Parquet, JSONL; format by its suffix) under the model's data config."""
    cfg = dict(manifest.get("data") or {})
    if not cfg:
        raise ValueError("this published model has no data config: predict through `fingpt-infer serve` records")
    table = read_table(path, None, cfg.get("encoding") or "utf-8")
    label = cfg.get("label") or {}
    column = label.get("column")
    labelled = column is None or column in table.columns
    if not labelled:
        lookup, _ = class_mapping(label["classes"])
        table[column] = next(iter(lookup))  # a placeholder: the labels of an unlabelled file are never read
    data = table_to_dataset(table, cfg)
    if len(data) == len(table):
        refs = [{"source": str(s), "row": int(r)} for s, r in zip(table["_source"], table["_row"], strict=True)]
    else:
        refs = [{"record": i + 1} for i in range(len(data))]
    return InputTable(data, refs, labelled)


def record_inputs(data: BankDataset, index: int) -> dict[str, Any]:
    """One record as the model sees it (text, real series steps), for hashing in the audit log."""
    record: dict[str, Any] = {}
    if data.texts is not None:
        record["text"] = data.texts[index]
    if data.series is not None and data.mask is not None:  # BankDataset refuses a series without its mask
        record["series"] = data.series[index][data.mask[index]].tolist()
    return record


def static_features(manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(numeric, categorical) static feature names of a published model; ([], []) without features."""
    static = (manifest.get("model") or {}).get("features") or {}
    return list(static.get("numeric") or []), list(static.get("categorical") or [])


def check_features(record: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """The record's `features` name exactly the model's; numeric ones are finite float32 numbers."""
    numeric, categorical = static_features(manifest)
    given = record.get("features")
    if not numeric and not categorical:
        if given is not None:
            raise ValueError("this model has no static features: leave 'features' out")
        return
    if given is None:
        raise ValueError(f"this model reads static features: give 'features' with {', '.join(numeric + categorical)}")
    missing = [name for name in numeric + categorical if name not in given]
    unknown = sorted(set(given) - set(numeric + categorical))
    if missing or unknown:
        raise ValueError(
            f"'features' lacks {missing} and has unknown {unknown}; the model takes {numeric + categorical}"
        )
    for name in numeric:
        if not _model_number(given[name]):
            raise ValueError(
                f"'features.{name}' is not a finite number within float32 range "
                f"(at most {FLOAT32_MAX:.3g} in magnitude)"
            )
    for name in categorical:
        if str(given[name]).strip() == "":
            raise ValueError(f"'features.{name}' is empty")


def check_record(record: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """A request record fits the model: the inputs it was trained on, the right series width and length."""
    check_features(record, manifest)
    num_features = int(manifest["num_features"])
    if expects_text(manifest) and record.get("text") is None:
        raise ValueError("this model reads text: give 'text'")
    if not expects_text(manifest) and record.get("text") is not None:
        raise ValueError("this model was trained without text: leave 'text' out")
    series = record.get("series")
    if num_features == 0:
        if series is not None:
            raise ValueError("this model has no series encoder: leave 'series' out")
        return
    if series is None:
        raise ValueError(f"this model reads a series: give 'series' as steps of {num_features} numbers")
    max_steps = int(manifest["model"]["series_encoder"]["max_steps"])
    if len(series) > max_steps:
        raise ValueError(f"'series' has {len(series)} steps; the model takes at most {max_steps}")
    for step, values in enumerate(series):
        if len(values) != num_features:
            names = manifest.get("feature_names") or []
            raise ValueError(
                f"'series' step {step} has {len(values)} values; the model takes {num_features} "
                f"per step ({', '.join(names)})"
            )
        for feature, value in enumerate(values):
            if not _model_number(value):
                raise ValueError(
                    f"'series' step {step} value {feature} is not a finite number within float32 range "
                    f"(at most {FLOAT32_MAX:.3g} in magnitude)"
                )


def _model_number(value: Any) -> bool:
    """A number the model can read: not a bool, finite, and still finite as float32 (no OverflowError on 10**400)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and abs(value) <= FLOAT32_MAX
    except OverflowError:
        return False


def records_to_dataset(records: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]) -> BankDataset:
    """Checked request records as a BankDataset (series padded at the end, labels unused)."""
    texts = [str(r["text"]) for r in records] if expects_text(manifest) else None
    series = mask = None
    if int(manifest["num_features"]) > 0:
        steps = max(len(r["series"]) for r in records)
        series = np.zeros((len(records), steps, int(manifest["num_features"])), dtype=np.float32)
        mask = np.zeros((len(records), steps), dtype=bool)
        for i, record in enumerate(records):
            series[i, : len(record["series"])] = record["series"]
            mask[i, : len(record["series"])] = True
    return BankDataset(
        texts=texts,
        series=series,
        mask=mask,
        labels=np.zeros(len(records), dtype=np.int64),
        class_names=list(manifest["class_names"]),
        feature_names=list(manifest.get("feature_names", [])),
        features=_static(records, manifest),
    )


def _static(records: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]) -> StaticFeatures | None:
    numeric, categorical = static_features(manifest)
    if not numeric and not categorical:
        return None
    numbers = np.array([[float(r["features"][name]) for name in numeric] for r in records], dtype=np.float32)
    hashes = np.stack([hashes_of([r["features"][name] for name in categorical]) for r in records])
    return StaticFeatures(numbers, hashes, numeric, categorical)
