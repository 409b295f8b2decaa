"""A `BankDataset` on disk (NumPy arrays + JSON), so a prepared bank folder loads without its sources."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fingpt_federated.data.errors import DataError
from fingpt_federated.data.features import StaticFeatures
from fingpt_federated.data.records import BankDataset

ARRAYS = "arrays.npz"
META = "meta.json"


def save_records(data: BankDataset, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": data.labels}
    if data.series is not None and data.mask is not None:  # BankDataset refuses a series without its mask
        arrays.update(series=data.series, mask=data.mask)
    arrays.update({f"key__{name}": values.astype(str) for name, values in data.keys.items()})
    if data.features is not None:
        arrays.update(static_numeric=data.features.numeric, static_categorical=data.features.categorical)
    # allow_pickle spelled out (numpy's default): otherwise mypy matches **arrays against it
    np.savez_compressed(folder / ARRAYS, allow_pickle=True, **arrays)
    meta: dict[str, object] = {
        "class_names": data.class_names,
        "feature_names": data.feature_names,
        "texts": data.texts,
    }
    if data.features is not None:
        static = data.features
        meta["static_features"] = {"numeric": static.numeric_names, "categorical": static.categorical_names}
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")
    return folder


def load_records(folder: str | Path) -> BankDataset:
    """A saved data set, checked as a data file is: a damaged or doctored folder is a one-line DataError."""
    folder = Path(folder)
    if not (folder / ARRAYS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"{folder} is not a saved data set (needs {ARRAYS} and {META})")
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(folder / META, f"not readable: {error}") from None
    try:
        with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
            data = BankDataset(
                texts=meta["texts"],
                series=arrays["series"] if "series" in arrays else None,
                mask=arrays["mask"] if "mask" in arrays else None,
                labels=arrays["labels"],
                class_names=meta["class_names"],
                feature_names=meta["feature_names"],
                keys={name[len("key__") :]: arrays[name] for name in arrays.files if name.startswith("key__")},
                features=_static_features(meta, arrays),
            )
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as error:
        raise DataError(folder / ARRAYS, f"not a readable saved data set: {error}") from None
    _check_values(data, folder / ARRAYS)
    return data


def _static_features(meta: dict, arrays: Any) -> StaticFeatures | None:
    names = meta.get("static_features")
    if names is None:
        return None
    numeric, categorical = arrays["static_numeric"], arrays["static_categorical"]
    if not np.issubdtype(numeric.dtype, np.floating) or categorical.dtype != np.int64:
        raise TypeError(f"static features must be floats and int64 hashes, got {numeric.dtype}, {categorical.dtype}")
    if numeric.shape[1:] != (len(names["numeric"]),) or categorical.shape[1:] != (len(names["categorical"]),):
        raise ValueError("static feature arrays do not match their names")
    with np.errstate(over="ignore"):  # beyond float32 becomes inf: refused in _check_values
        return StaticFeatures(numeric, categorical, list(names["numeric"]), list(names["categorical"]))


def _check_values(data: BankDataset, path: Path) -> None:
    """What the loaders guarantee for a data file holds for a saved one too: finite float32 steps, known labels."""
    if data.series is not None:
        if not np.issubdtype(data.series.dtype, np.floating) or data.mask is None or data.mask.dtype != np.bool_:
            raise DataError(path, f"series must be floats with a bool mask, got {data.series.dtype}")
        with np.errstate(over="ignore"):  # beyond float32 becomes inf: refused just below
            data.series = data.series.astype(np.float32, copy=False)
        bad = (~np.isfinite(data.series)).any(axis=(1, 2)).nonzero()[0]
        if len(bad):
            raise DataError(path, f"record {bad[0] + 1} has a NaN, infinite or beyond-float32 series value")
    if data.features is not None:
        bad = (~np.isfinite(data.features.numeric)).any(axis=1).nonzero()[0]
        if len(bad):
            raise DataError(path, f"record {bad[0] + 1} has a NaN, infinite or beyond-float32 static feature")
    outside = ((data.labels < 0) | (data.labels >= data.num_classes)).nonzero()[0]
    if len(outside):
        label = data.labels[outside[0]]
        raise DataError(path, f"record {outside[0] + 1} has label {label}, not one of the {data.num_classes} classes")
    if data.texts is not None and not all(isinstance(text, str) for text in data.texts):
        raise DataError(path.with_name(META), "texts must be strings")
