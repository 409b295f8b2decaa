"""Reading a bank's tables (delimited text, Parquet, JSONL) into string-typed frames, refusing unreadable files.

Every cell of a delimited file is kept as text so that the data layer, not pandas, decides what is
numeric and can name the exact row and column of a bad value. Delimited files are read by
data/delimited.py under the data config's `table:` options. JSONL numbers stay numbers, except an
integer too long to be a float (10**400): it stays its digits, which the data layer then refuses by row
and column instead of overflowing.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from fingpt_federated.data.delimited import TableReading, read_delimited
from fingpt_federated.data.errors import DataError

FLOAT_DIGITS = 308  # an integer with more digits is beyond float64 (and far beyond float32)
FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def resolve_paths(pattern: str | Path) -> list[Path]:
    """The files a path or glob pattern names, sorted; an error if there are none."""
    text = str(Path(pattern).expanduser())
    paths = sorted(Path(p) for p in glob.glob(text)) if glob.has_magic(text) else [Path(text)]
    if not paths:
        raise DataError(text, "no file matches this pattern")
    for path in paths:
        if not path.is_file():
            raise DataError(path, "file not found")
    return paths


def read_table(
    pattern: str | Path,
    fmt: str | None = None,
    encoding: str = "utf-8",
    table: Mapping[str, Any] | None = None,
    table_key: str = "data.table",
) -> pd.DataFrame:
    """All files of `pattern` stacked into one frame; `_source` and `_row` say where each row came from.

    `table` is a `table:` block of the data config, at `table_key` (delimited files only; None =
    comma-separated with a header). `_row` of a delimited file counts the file's lines
    (data/delimited.py); of JSONL, its records.
    """
    reading = TableReading.of(table, table_key)
    frames = []
    for path in resolve_paths(pattern):
        frame = _read_one(path, fmt or _format_of(path), encoding, reading)
        frame["_source"] = str(path)
        if "_row" not in frame:
            frame["_row"] = range(1, len(frame) + 1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def _format_of(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            path, f"unknown file type {path.suffix!r}; use one of {sorted(set(FORMATS.values()))} or set data.format"
        ) from None


def _read_one(path: Path, fmt: str, encoding: str, reading: TableReading) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    if fmt != "csv" and not reading.is_default():
        raise DataError(path, f"{reading.key} options apply to delimited text (format csv), not {fmt}")
    if fmt == "parquet":
        frame = _read_parquet(path)
    elif fmt in ("csv", "jsonl"):
        text = _decode(path, encoding)
        frame = read_delimited(path, text, reading) if fmt == "csv" else _read_jsonl(path, text)
    else:
        raise DataError(path, f"unknown format {fmt!r}; use csv, parquet or jsonl")
    if frame.empty:
        raise DataError(path, "file has no data rows")
    return frame


def _decode(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            path,
            f"line {line} is not valid {encoding} (byte 0x{raw[err.start]:02x}); "
            "set data.encoding to the file's encoding",
        ) from None
    except LookupError:
        raise DataError(path, f"unknown encoding {encoding!r} in data.encoding") from None


def _json_int(digits: str) -> int | str:
    """A JSON integer as int, or as its text when it could never be a number the model reads."""
    return int(digits) if len(digits.lstrip("-")) <= FLOAT_DIGITS else digits


def _read_jsonl(path: Path, text: str) -> pd.DataFrame:
    records = []
    for row, line in enumerate((ln for ln in text.splitlines() if ln.strip()), start=1):
        try:
            value = json.loads(line, parse_int=_json_int)
        except json.JSONDecodeError as err:
            raise DataError(path, f"not valid JSON: {err.msg}", row=row) from None
        if not isinstance(value, dict):
            raise DataError(path, "each line must be a JSON object", row=row)
        records.append(value)
    return pd.DataFrame.from_records(records)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(path, f"not a readable Parquet file: {err}") from None
