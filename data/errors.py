"""The one error a bank sees for bad data: which file, which row, which column, what is wrong."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Invalid input data. Rows are counted from 1 over data rows (a CSV header is not a row); in a
    delimited file row R is line R + 1 when it has a header line, line R without (data/delimited.py)."""

    def __init__(self, path: str | Path, message: str, *, row: int | None = None, column: str | None = None):
        self.path = str(path)
        self.row = row
        self.column = column
        self.message = message
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")


class DataConfigError(DataError):
    """A data config that cannot be applied, named by its key instead of a file: `data.table.delimiter: ...`."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
