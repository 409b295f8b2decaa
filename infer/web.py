"""The HTTP service: FastAPI app over a PredictionService (OpenAPI at /openapi.json, docs at /docs).

The app is built only for a model that passes its self-check (infer/self_check.py), so
`serve` refuses a broken model before it binds its port; /health reports what the model can do.

Bad input is a 422 with a message that says what is wrong and where, never a 500, and never an
echo of the input (which may hold PII): FastAPI's default validation response is replaced.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fingpt_federated.infer.inputs import check_record
from fingpt_federated.infer.schemas import Health, PredictRequest, PredictResponse
from fingpt_federated.infer.self_check import run_self_check
from fingpt_federated.infer.service import PredictionService
from fingpt_federated.privacy.redaction import redact


def _problem(loc: list[Any], message: str) -> dict[str, Any]:
    return {"loc": [redact(str(part)) if isinstance(part, str) else part for part in loc], "msg": redact(message)}


def create_app(service: PredictionService) -> FastAPI:
    card = service.card
    variant = service.predictor.published.variant
    capabilities = run_self_check(service.predictor)
    app = FastAPI(
        title="fingpt-infer",
        version=str(card["model_hash"])[:12],
        description=f"{card['name']}: classes {', '.join(card['class_names'])}",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_problem(list(e.get("loc", [])), str(e.get("msg", "invalid"))) for e in error.errors()]
        return JSONResponse(status_code=422, content={"detail": problems})

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            variant=variant,
            model_hash=service.model_hash,
            cache_hits=service.cache.hits,
            cache_misses=service.cache.misses,
            **asdict(capabilities),
        )

    @app.get("/model")
    def model_card() -> dict[str, Any]:
        return dict(card)

    @app.post("/predict", response_model=PredictResponse, responses={422: {"description": "invalid input"}})
    def predict(request: PredictRequest) -> PredictResponse | JSONResponse:
        records = request.batch()
        problems = []
        for i, record in enumerate(records):
            try:
                check_record(record, service.predictor.published.manifest)
            except ValueError as error:
                loc = ["body", "records", i] if request.records is not None else ["body"]
                problems.append(_problem(loc, str(error)))
        if problems:
            return JSONResponse(status_code=422, content={"detail": problems})
        predictions = service.predict_records(records, explain=request.explain, mc_samples=request.mc_samples)
        # validated like the constructor would; model_validate takes the predictions as the dicts they are
        return PredictResponse.model_validate(
            {"model_hash": service.model_hash, "variant": variant, "predictions": predictions}
        )

    return app
