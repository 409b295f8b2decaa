"""Turning table columns into labels, texts and numbers, with an exact error for every bad cell."""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from fingpt_federated.data.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)  # the model reads float32: a larger number would become inf
SHOWN_CHARS = 40
NUMBER_SPECS = "eEfFgGn%"  # format types that need a number: `{LIMIT_BAL:.0f}`
NON_FINITE_WORDS = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")


def shown(value: str) -> str:
    """A cell quoted for an error line, shortened so that a hostile 10,000-character cell stays one short line."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"


def where(table: pd.DataFrame, position: int) -> tuple[str, int]:
    """(file, row) of the table row at `position`."""
    return str(table["_source"].iat[position]), int(table["_row"].iat[position])


def require_columns(table: pd.DataFrame, columns: list[str], role: str) -> None:
    """Refuse a table that lacks a configured column, naming the file and what it does have."""
    present = [c for c in table.columns if not c.startswith("_")]
    for column in columns:
        if column not in table.columns:
            raise DataError(table["_source"].iat[0], f"missing {role} column; the file has {present}", column=column)


def canonical(value: Any) -> str:
    """A cell as the text a config key is compared with: 1, 1.0 and "1" all become "1"."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return str(value).strip()


def class_mapping(classes: Mapping[Any, str] | list[str]) -> tuple[dict[str, int], list[str]]:
    """From the config's `label.classes` (raw value -> name, or a list of names) to value -> index."""
    if isinstance(classes, Mapping):
        names = [str(name) for name in classes.values()]
        lookup = {canonical(raw): names.index(str(name)) for raw, name in classes.items()}
    else:
        names = [str(name) for name in classes]
        lookup = {canonical(name): i for i, name in enumerate(names)}
    if len(names) < 2:
        raise ValueError(f"label.classes needs at least two classes, got {names}")
    return lookup, list(dict.fromkeys(names))


def labels_from(
    table: pd.DataFrame, column: str, classes: Mapping[Any, str] | list[str]
) -> tuple[np.ndarray, list[str]]:
    """Class indices of a label column; an unmapped or missing label is an error at its row."""
    require_columns(table, [column], "label")
    lookup, names = class_mapping(classes)
    raw = table[column].map(canonical)
    indices = raw.map(lookup)
    bad = indices.isna().to_numpy().nonzero()[0]
    if len(bad):
        path, row = where(table, bad[0])
        value = raw.iat[bad[0]]
        problem = "missing label" if value in ("", "nan", "None") else f"unknown label {shown(value)}"
        raise DataError(path, f"{problem}; label.classes maps {sorted(lookup)}", row=row, column=column)
    return indices.to_numpy(dtype=np.int64), names


def numeric(table: pd.DataFrame, column: str) -> np.ndarray:
    """A column as float64; text, empty, NaN, infinite or beyond-float32 cells are errors at their row."""
    cells = table[column]
    values = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64)
    bad = (~(np.abs(values) <= FLOAT32_MAX)).nonzero()[0]  # NaN compares False: caught too
    if len(bad):
        path, row = where(table, bad[0])
        cell = canonical(cells.iat[bad[0]])
        raise DataError(path, _number_problem(cell, values[bad[0]]), row=row, column=column)
    return values


def _number_problem(cell: str, value: float) -> str:
    if cell in ("", "None"):
        return "empty value"
    if np.isfinite(value):
        return f"value {shown(cell)} is out of range (at most {FLOAT32_MAX:.3g} in magnitude)"
    return f"value {shown(cell)} is not a finite number"


def texts_from(table: pd.DataFrame, text_cfg: Mapping[str, Any], extra: pd.DataFrame | None = None) -> list[str] | None:
    """The text of each row: a text column, or a template filled from columns (and `extra` statistics)."""
    if text_cfg.get("column"):
        column = text_cfg["column"]
        require_columns(table, [column], "text")
        texts = table[column].map(lambda v: "" if v is None else str(v).strip())
        empty = (texts == "").to_numpy().nonzero()[0]
        if len(empty):
            path, row = where(table, empty[0])
            raise DataError(path, "empty text", row=row, column=column)
        return texts.tolist()
    if text_cfg.get("template"):
        return _fill_template(table, text_cfg["template"], text_cfg.get("value_maps") or {}, extra)
    return None


def _fill_template(
    table: pd.DataFrame, template: str, value_maps: Mapping[str, Mapping[Any, str]], extra: pd.DataFrame | None
) -> list[str]:
    parsed = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name]
    context = (
        table if extra is None else pd.concat([table.reset_index(drop=True), extra.reset_index(drop=True)], axis=1)
    )
    require_columns(context, [name for name, _ in parsed], "text.template")
    as_number = {name for name, spec in parsed if spec and spec[-1] in NUMBER_SPECS}
    columns = {
        name: _template_values(context, name, value_maps.get(name), name in as_number)
        for name in dict.fromkeys(name for name, _ in parsed)
    }
    return [template.format(**{name: values[i] for name, values in columns.items()}) for i in range(len(context))]


def _template_values(
    context: pd.DataFrame, name: str, value_map: Mapping[Any, str] | None, as_number: bool
) -> list[Any]:
    """Mapped words where a value map is given; numbers stay numbers so `{x:.0f}` works.

    A field formatted as a number (`{x:.0f}`) must be a finite number in every row; in any field a
    NaN or infinite number (JSON NaN, "inf", 1e400) is an error at its row, never text like "inf".
    """
    if as_number:
        return numeric(context, name).tolist()
    cells = context[name]
    as_numbers = pd.to_numeric(cells, errors="coerce")
    texts = cells.map(canonical)
    bad = (np.isinf(as_numbers) | texts.str.lower().isin(NON_FINITE_WORDS)).to_numpy().nonzero()[0]
    if len(bad):
        path, row = where(context, bad[0])
        raise DataError(path, f"value {shown(texts.iat[bad[0]])} is not a finite number", row=row, column=name)
    if value_map is not None:
        words = {canonical(k): str(v) for k, v in value_map.items()}
        return [words.get(text, text) for text in texts]
    return as_numbers.tolist() if as_numbers.notna().all() else texts.tolist()
