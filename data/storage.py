"""A `BankDataset` on disk (NumPy arrays + JSON), so a prepared bank folder loads without its sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
    # allow_pickle spelled out (numpy's default): otherwise mypy matches **arrays against it
    np.savez_compressed(folder / ARRAYS, allow_pickle=True, **arrays)
    meta = {"class_names": data.class_names, "feature_names": data.feature_names, "texts": data.texts}
    (folder / META).write_text(json.dumps(meta), encoding="utf-8")
    return folder


def load_records(folder: str | Path) -> BankDataset:
    folder = Path(folder)
    if not (folder / ARRAYS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"{folder} is not a saved data set (needs {ARRAYS} and {META})")
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
        return BankDataset(
            texts=meta["texts"],
            series=arrays["series"] if "series" in arrays else None,
            mask=arrays["mask"] if "mask" in arrays else None,
            labels=arrays["labels"],
            class_names=meta["class_names"],
            feature_names=meta["feature_names"],
            keys={name[len("key__") :]: arrays[name] for name in arrays.files if name.startswith("key__")},
        )
