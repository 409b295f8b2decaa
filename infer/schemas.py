"""Request and response bodies of the HTTP service (validated by pydantic; FastAPI turns them into OpenAPI).

The sizes a request may have (records, text characters, series steps, mc_samples) are the
service's limits, set by `fingpt-infer serve` options and reported by /health: infer/limits.py
checks them after parsing, which the body-size limit bounds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RecordIn(BaseModel):
    """One record: the model's text and/or its series (steps, oldest first, each a list of feature values)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    text: str | None = Field(default=None, min_length=1, description="at most max_text_chars (/health)")
    series: list[list[float]] | None = Field(default=None, min_length=1, description="at most max_series_steps")
    features: dict[str, float | str] | None = Field(
        default=None, description="static features by name: a finite number (numeric) or a value (categorical)"
    )

    def inputs(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class PredictRequest(RecordIn):
    """Either one record (`text` and/or `series`) or a batch (`records`), with options."""

    records: list[RecordIn] | None = Field(default=None, min_length=1, description="at most max_records (/health)")
    explain: bool = True
    mc_samples: int = Field(default=0, ge=0, description="Monte Carlo dropout passes (0: off), at most max_mc_samples")

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        single = self.text is not None or self.series is not None or self.features is not None
        if single == (self.records is not None):
            raise ValueError(
                "give either 'text'/'series'/'features' for one prediction or 'records' for a batch, "
                "not both and not neither"
            )
        return self

    def batch(self) -> list[dict[str, Any]]:
        if self.records is not None:
            return [record.inputs() for record in self.records]
        return [RecordIn(text=self.text, series=self.series, features=self.features).inputs()]


class PredictionOut(BaseModel):
    label: str
    probabilities: dict[str, float]
    uncertainty: dict[str, float]
    explanation: dict[str, Any] | None = None


class PredictResponse(BaseModel):
    model_hash: str
    variant: str
    predictions: list[PredictionOut]


class Capabilities(BaseModel):
    """What the served model takes and gives: found by its self-check (infer/self_check.py) before the
    service binds its port, reported by /health."""

    model_config = ConfigDict(frozen=True)

    classes: list[str]
    text: bool
    series: bool
    num_features: int
    max_series_steps: int
    explain: bool
    self_check: str = "passed"


class Health(Capabilities):
    status: str
    variant: str
    model_hash: str
    cache_hits: int
    cache_misses: int
    limits: dict[str, int | float]
    in_progress: int
