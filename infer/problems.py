"""Error bodies of `fingpt-infer serve`: where the problem is and what the rule is, never what was sent.

A request may hold PII, and even its key names are the caller's text: an error names the field
path in the schema's own words (field names, list indexes) and the limit or rule, nothing else.
An unknown key is reported as "(unknown key)" under its parent, with the keys that are accepted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from starlette.responses import JSONResponse

from fingpt_federated.infer.schemas import PredictRequest, RecordIn
from fingpt_federated.privacy.redaction import redact

PLACES = ("body", "query", "path", "header")
UNKNOWN_KEY = "(unknown key)"


def problem(loc: Iterable[Any], msg: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": redact(msg)}


def problem_response(
    status: int, problems: list[dict[str, Any]], headers: dict[str, str] | None = None
) -> JSONResponse:
    """{"detail": [{"loc": [...], "msg": "...", "limit": {name: value} when a limit was passed}, ...]}."""
    return JSONResponse(status_code=status, content={"detail": problems}, headers=headers)


def _model_at(loc: list[Any]) -> type[BaseModel]:
    return RecordIn if "records" in loc[:2] and any(isinstance(part, int) for part in loc[2:3]) else PredictRequest


def safe_loc(loc: Iterable[Any]) -> list[Any]:
    """The path with every name that is not one of the schema's own replaced by UNKNOWN_KEY."""
    known = {*PLACES, *PredictRequest.model_fields, *RecordIn.model_fields}
    return [part if isinstance(part, int) or part in known else UNKNOWN_KEY for part in loc]


def validation_problem(error: Mapping[str, Any]) -> dict[str, Any]:
    """One pydantic/FastAPI validation error without its `input` (and, for an unknown key, without the key)."""
    loc = list(error.get("loc", ()))
    if error.get("type") == "extra_forbidden":
        parent = safe_loc(loc[:-1])
        accepted = ", ".join(_model_at(parent).model_fields)
        return problem([*parent, UNKNOWN_KEY], f"unknown key; the keys accepted here are {accepted}")
    return problem(safe_loc(loc), str(error.get("msg", "invalid")))
