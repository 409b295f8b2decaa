"""Numbers in the console and report.md tables: a fixed number of digits, a dash where none was measured."""

from __future__ import annotations

import math


def figure(value: float | None, digits: int = 4) -> str:
    """`value` to `digits` decimals; "-" for a figure that is missing (None or NaN)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"
