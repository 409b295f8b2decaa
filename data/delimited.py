"""Delimited text tables (CSV, `sentence@label`, whitespace-separated) under the data config's `table:` options.

Read record by record (Python's csv module, or a whitespace splitter) so that every record keeps
the line of the file it starts on: a data error names `row R`, which is line R + 1 of the file when
it has a header line and line R when it has none, whatever lines were skipped, commented out or blank.
Every record must have exactly as many fields as there are column names: a stray delimiter inside a
cell is refused by row, never shifted into the next column.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fingpt_federated.data.errors import DataConfigError, DataError

WHITESPACE = "whitespace"
Record = tuple[int, list[str]]  # (the file line the record starts on, its fields)


@dataclass(frozen=True)
class TableReading:
    """The checked `data.table` block (data/config.py `TableOptions` documents each option)."""

    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] | None = None
    quote: str | None = '"'
    comment: str | None = None
    skip_rows: int = 0
    key: str = field(default="data.table", compare=False)  # where the block is, for error messages

    @classmethod
    def of(cls, table: Mapping[str, Any] | None, key: str = "data.table") -> TableReading:
        """The options of a `table:` block at `key` (None: the defaults), or a DataConfigError naming the bad key."""
        options = dict(table or {})
        columns = options.get("columns")
        reading = cls(**{**options, "columns": None if columns is None else tuple(str(c) for c in columns), "key": key})
        reading.check()
        return reading

    def is_default(self) -> bool:
        return self == TableReading()

    def check(self) -> None:
        if self.delimiter != WHITESPACE and (len(self.delimiter) != 1 or self.delimiter in "\r\n"):
            raise DataConfigError(
                f"{self.key}.delimiter", f"must be one character or {WHITESPACE!r}, got {self.delimiter!r}"
            )
        for key in ("quote", "comment"):
            value = getattr(self, key)
            if value is not None and (len(value) != 1 or value in "\r\n" or value.isspace()):
                raise DataConfigError(f"{self.key}.{key}", f"must be one character or null, got {value!r}")
            if value is not None and value == self.delimiter:
                raise DataConfigError(f"{self.key}.{key}", f"{value!r} is also the delimiter")
        if self.quote is not None and self.quote == self.comment:
            raise DataConfigError(f"{self.key}.comment", f"{self.comment!r} is also the quote character")
        if self.skip_rows < 0:
            raise DataConfigError(f"{self.key}.skip_rows", f"must be 0 or more, got {self.skip_rows}")
        if not self.header and not self.columns:
            raise DataConfigError(
                f"{self.key}.columns", f"a file without a header ({self.key}.header: false) needs them"
            )
        if self.columns is not None:
            _check_names(list(self.columns), f"{self.key}.columns")


def read_delimited(path: Path, text: str, reading: TableReading) -> pd.DataFrame:
    """The records of one decoded file as a string frame, with `_row` (see the module docstring)."""
    split = _whitespace_records if reading.delimiter == WHITESPACE else _csv_records
    records = split(path, text, reading)
    names = list(reading.columns) if reading.columns else []
    if reading.header:
        header = next(records, None)
        if header is None:
            raise DataError(path, "file has no header and no data rows")
        names = _header_names(path, header[1], reading)
    rows, lines = [], []
    for line, fields in records:
        if len(fields) != len(names):
            raise DataError(path, _field_count(len(fields), names, reading), row=_row(line, reading))
        rows.append(fields)
        lines.append(_row(line, reading))
    frame = pd.DataFrame(rows, columns=names, dtype=str)
    frame["_row"] = lines
    return frame


def _row(line: int, reading: TableReading) -> int:
    return line - 1 if reading.header else line


def _csv_records(path: Path, text: str, reading: TableReading) -> Iterator[Record]:
    lines = list(io.StringIO(text, newline=""))[reading.skip_rows :]
    if reading.quote is None:
        reader = csv.reader(iter(lines), delimiter=reading.delimiter, quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(iter(lines), delimiter=reading.delimiter, quotechar=reading.quote)
    while True:
        start = reader.line_num  # lines consumed before this record: it starts on the next one
        line = reading.skip_rows + start + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            hint = "" if reading.quote is None else f" (a {reading.quote} quote never closed? see {reading.key}.quote)"
            raise DataError(path, f"not a valid delimited table: {error}{hint}", row=_row(line, reading)) from None
        if _skipped(lines[start], reading):
            continue
        yield line, fields


def _whitespace_records(path: Path, text: str, reading: TableReading) -> Iterator[Record]:
    """Fields separated by runs of spaces and tabs; a quoted field may hold spaces (but not its quote)."""
    quote = reading.quote
    q = re.escape(quote or '"')
    pattern = re.compile(rf"{q}([^{q}]*){q}(?=\s|$)|(\S+)")  # a quoted field, else a bare one
    for number, raw in enumerate(io.StringIO(text, newline=""), start=1):
        if number <= reading.skip_rows or _skipped(raw, reading):
            continue
        if quote is None:
            yield number, raw.split()
            continue
        fields = []
        for match in pattern.finditer(raw.strip()):
            quoted, bare = match.group(1), match.group(2)
            if bare is not None and quote in bare:
                raise DataError(path, f"unbalanced {quote} quote in {bare!r}", row=_row(number, reading))
            fields.append(quoted if bare is None else bare)
        yield number, fields


def _skipped(raw: str, reading: TableReading) -> bool:
    """A blank line, or a comment line (its first non-blank character is `comment`)."""
    stripped = raw.strip()
    return not stripped or (reading.comment is not None and stripped.startswith(reading.comment))


def _header_names(path: Path, header: list[str], reading: TableReading) -> list[str]:
    names = [name.strip() for name in header]
    if reading.columns:
        if len(reading.columns) != len(names):
            raise DataError(
                path,
                f"{reading.key}.columns names {len(reading.columns)} columns but the header has {len(names)}",
            )
        return list(reading.columns)
    try:
        _check_names(names, "the header")
    except DataConfigError as error:
        raise DataError(path, error.message) from None
    return names


def _check_names(names: list[str], source: str) -> None:
    if any(not name for name in names):
        raise DataConfigError(source, f"column {names.index('') + 1} has no name")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataConfigError(source, f"names {', '.join(duplicates)} more than once")


def _field_count(found: int, names: list[str], reading: TableReading) -> str:
    source = "the header" if reading.header and not reading.columns else f"{reading.key}.columns"
    delimiter = "whitespace" if reading.delimiter == WHITESPACE else repr(reading.delimiter)
    message = f"{found} fields, but {source} names {len(names)} columns (delimiter {delimiter})"
    if found > len(names) and reading.delimiter != WHITESPACE and reading.quote is not None:
        message += f"; a cell holding the delimiter must be quoted with {reading.quote}"
    return message
