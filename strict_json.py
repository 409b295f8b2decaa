"""Values for strict JSON: Python's json writes NaN and Infinity, which strict readers (browsers,
jq, most other languages) reject; run files and model cards write them as null instead."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def jsonable(value: Any) -> Any:
    """`value` with NaN and infinities as None (null): strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, Iterable) and not isinstance(value, str):
        return [jsonable(item) for item in value]
    return value
