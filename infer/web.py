"""The HTTP service: FastAPI app over a PredictionService (OpenAPI at /openapi.json, docs at /docs).

The app is built only for a model that passes its self-check (infer/self_check.py), so
`serve` refuses a broken model before it binds its port; /health reports what the model can do.

Bad input is a 422 with a message that says what is wrong and where, never a 500, and never an
echo of the input (which may hold PII), key names included (infer/problems.py): FastAPI's
default validation response is replaced.

The service is bounded (infer/limits.py, infer/guards.py): API key, body size and time to send it
before the app reads anything; then records, text, series steps and mc_samples (422 naming the
limit); then admission (infer/scheduling.py: at most `max_in_progress` requests, and none that would
finish past the time limit behind the work ahead of it; else 503 with Retry-After); each
admitted request runs in a worker thread under its time limit, 504 when it passes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fingpt_federated.infer.guards import Guard
from fingpt_federated.infer.inputs import check_record
from fingpt_federated.infer.limits import Deadline, Limits, TimeLimitExceeded, passes, request_problems
from fingpt_federated.infer.problems import problem, problem_response, validation_problem
from fingpt_federated.infer.scheduling import Busy
from fingpt_federated.infer.schemas import Health, PredictRequest, PredictResponse
from fingpt_federated.infer.self_check import run_self_check
from fingpt_federated.infer.service import PredictionService


def model_problems(request: PredictRequest, records: list[dict[str, Any]], manifest: dict[str, Any]) -> list[dict]:
    """Records that do not fit the model (its inputs, series width and length)."""
    problems = []
    for i, record in enumerate(records):
        try:
            check_record(record, manifest)
        except ValueError as error:
            problems.append(problem(["body", "records", i] if request.records is not None else ["body"], str(error)))
    return problems


def create_app(service: PredictionService, limits: Limits | None = None, api_key: bytes | None = None) -> FastAPI:
    """The app; `api_key`: required (Bearer or X-API-Key) on every path but /health."""
    limits = limits or Limits()
    card = service.card
    variant = service.predictor.published.variant
    capabilities = run_self_check(service.predictor)
    scheduler = service.scheduler
    scheduler.capacity, scheduler.time_limit_s = limits.max_in_progress, limits.time_limit_s
    workers = ThreadPoolExecutor(limits.max_in_progress, thread_name_prefix="fingpt-predict")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="fingpt-infer",
        version=str(card["model_hash"])[:12],
        description=f"{card['name']}: classes {', '.join(card['class_names'])}",
        lifespan=lifespan,
    )
    app.add_middleware(Guard, max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.time_limit_s, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        return problem_response(422, [validation_problem(e) for e in error.errors()])

    @app.get("/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok",
            variant=variant,
            model_hash=service.model_hash,
            cache_hits=service.cache.hits,
            cache_misses=service.cache.misses,
            **capabilities.model_dump(),
            limits=limits.as_dict(),
            in_progress=scheduler.in_progress,
        )

    @app.get("/model")
    def model_card() -> dict[str, Any]:
        return dict(card)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses={
            401: {"description": "missing or wrong API key"},
            413: {"description": "body over --max-body-bytes"},
            422: {"description": "invalid input, or a limit passed (named)"},
            503: {"description": "--max-in-progress requests in progress: retry after Retry-After"},
            504: {"description": "the request ran past --time-limit-s"},
        },
    )
    async def predict(request: PredictRequest) -> PredictResponse | JSONResponse:
        deadline = Deadline(limits.time_limit_s)
        records = request.batch()
        problems = request_problems(records, request.mc_samples, limits, batch=request.records is not None)
        problems = problems or model_problems(request, records, service.predictor.published.manifest)
        if problems:
            return problem_response(422, problems)
        try:
            job = scheduler.admit(passes(len(records), request.mc_samples, request.explain))
        except Busy as busy:
            refusal = {**problem([], str(busy)), "limit": busy.limit}
            return problem_response(503, [refusal], {"Retry-After": str(busy.retry_after_s)})

        def admitted() -> list[dict[str, Any]]:
            try:
                return service.predict_records(
                    records, explain=request.explain, mc_samples=request.mc_samples, deadline=deadline, job=job
                )
            finally:
                scheduler.leave(job)  # when the work stops, not when the caller stops waiting

        work = asyncio.wrap_future(workers.submit(admitted))
        work.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved even when abandoned
        try:
            predictions = await asyncio.wait_for(asyncio.shield(work), deadline.remaining())
        except (TimeoutError, TimeLimitExceeded):
            over = problem([], f"the request ran past its time limit of {limits.time_limit_s} s (--time-limit-s)")
            return problem_response(504, [{**over, "limit": {"time_limit_s": limits.time_limit_s}}])
        # validated like the constructor would; model_validate takes the predictions as the dicts they are
        return PredictResponse.model_validate(
            {"model_hash": service.model_hash, "variant": variant, "predictions": predictions}
        )

    return app
