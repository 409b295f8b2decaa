"""A bounded `fingpt-infer serve`: every limit refused by name through a real uvicorn on loopback, no input echoed.

Each refusal is checked for a sentinel string the request carried (in a value or a key name):
an error body names the field and the limit, never what was sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from infer_fixtures import train_and_publish

from fingpt_federated.infer.cli import main as infer_main
from fingpt_federated.infer.guards import read_api_key
from fingpt_federated.infer.limits import Limits
from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.infer.scheduling import Busy, PriorityLock, Scheduler
from fingpt_federated.infer.service import PredictionService
from fingpt_federated.infer.web import create_app
from fingpt_federated.privacy.audit import AuditLog

pytestmark = pytest.mark.usefixtures("tiny_setting")

SENTINEL = "Zq7sentinelXw"
KEY = "k" * 20 + "-service-key"
SERIES = [[101.5, 2000.0], [99.0, 1800.0]]
LIMITS = Limits(max_body_bytes=4096, max_records=3, max_text_chars=40, max_series_steps=4, max_mc_samples=2)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_setting):
    root = tmp_path_factory.mktemp("limits")
    published, card = open_model(train_and_publish(root, ["fp32"], steps=10), "fp32")
    return PredictionService(Predictor(published), card, AuditLog(root / "audit.jsonl"), cache_size=0)


@contextlib.contextmanager
def serving(service: PredictionService, limits: Limits, api_key: bytes | None = None) -> Iterator[httpx.Client]:
    """The app on a real uvicorn on a free loopback port, stopped (and its thread joined) on exit."""
    app = create_app(service, limits, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def http(service):
    with serving(service, LIMITS) as client:
        yield client


def record(text: str = "acme surged", steps: int = 2) -> dict:
    return {"text": text, "series": [[1.0, 2.0]] * steps}


def assert_refused(response: httpx.Response, status: int, limit: str | None) -> None:
    assert response.status_code == status, response.text
    assert SENTINEL not in response.text and SENTINEL.lower() not in response.text.lower()
    if limit is not None:
        assert limit in json.dumps(response.json()["detail"])
        assert "--" + limit.replace("_", "-") in response.text  # the option that sets it


@pytest.mark.parametrize(
    "body, limit",
    [
        ({"records": [record(SENTINEL)] * 4}, "max_records"),
        ({"text": SENTINEL * 4, "series": SERIES}, "max_text_chars"),
        ({"records": [record(), record(SENTINEL, steps=5)]}, "max_series_steps"),
        ({**record(SENTINEL), "mc_samples": 3}, "max_mc_samples"),
    ],
)
def test_each_request_limit_is_a_422_that_names_it(http, body, limit):
    assert_refused(http.post("/predict", json=body), 422, limit)


def test_a_body_over_the_limit_is_a_413_by_its_length_or_as_it_streams(http):
    big = json.dumps({"text": SENTINEL * 400, "series": SERIES}).encode()
    assert_refused(http.post("/predict", content=big, headers={"content-type": "application/json"}), 413, None)
    response = http.post(
        "/predict", content=iter([big[:3000], big[3000:]]), headers={"content-type": "application/json"}
    )  # chunked: no Content-Length, refused once the bytes pass the limit
    assert_refused(response, 413, "max_body_bytes")


@pytest.mark.parametrize(
    "body",
    [
        {**record(), SENTINEL: 1},
        {"records": [{**record(), SENTINEL: "x"}]},
        {"text": [SENTINEL], "series": SERIES},
        {"text": "acme", "series": [[1.0, SENTINEL]]},
        {"records": SENTINEL},
        {"text": "acme", "series": SERIES, "mc_samples": SENTINEL},
    ],
)
def test_bad_input_names_the_field_but_echoes_neither_values_nor_key_names(http, body):
    assert_refused(http.post("/predict", json=body), 422, None)


def test_an_ordinary_request_within_the_limits_is_answered_and_health_reports_the_limits(http):
    response = http.post("/predict", json={"records": [record()] * 3, "mc_samples": 2})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 3
    health = http.get("/health").json()
    assert health["limits"] == LIMITS.as_dict() and health["in_progress"] == 0


@contextlib.contextmanager
def model_held(service: PredictionService) -> Iterator[None]:
    """The model taken by the test, so requests queue for it deterministically."""
    lock = service.scheduler.lock
    assert lock.acquire((-1, -1), timeout=10)
    try:
        yield
    finally:
        lock.release()


def in_progress(http: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 30
    while http.get("/health").json()["in_progress"] != count:
        assert time.monotonic() < deadline, f"never {count} requests in progress"
        time.sleep(0.02)


def test_when_full_a_request_gets_503_with_retry_after_and_the_admitted_one_completes(service):
    with serving(service, Limits(max_in_progress=1)) as http:
        first: list[httpx.Response] = []
        with model_held(service):
            other = httpx.Client(base_url=http.base_url, timeout=60)  # a client is not shared between threads
            waiting = threading.Thread(target=lambda: first.append(other.post("/predict", json=record())))
            waiting.start()
            in_progress(http, 1)
            refused = http.post("/predict", json=record(SENTINEL))
            assert_refused(refused, 503, "max_in_progress")
            assert int(refused.headers["retry-after"]) >= 1
        waiting.join(timeout=60)
        other.close()
        assert first[0].status_code == 200
        in_progress(http, 0)


def test_a_request_past_its_time_limit_gets_504_and_frees_its_place(service):
    with serving(service, Limits(time_limit_s=0.5, max_in_progress=1)) as http:
        with model_held(service):
            started = time.monotonic()
            assert_refused(http.post("/predict", json=record(SENTINEL)), 504, "time_limit_s")
            assert 0.4 < time.monotonic() - started < 10
            in_progress(http, 0)  # the worker stopped waiting for the model at the same deadline
        assert http.post("/predict", json=record()).status_code == 200


def test_the_api_key_is_required_everywhere_but_health(service):
    with serving(service, LIMITS, KEY.encode()) as http:
        assert http.get("/health").status_code == 200
        for headers in ({}, {"authorization": f"Bearer {SENTINEL}"}, {"x-api-key": SENTINEL}, {"authorization": KEY}):
            for call in (lambda h: http.post("/predict", json=record(), headers=h), lambda h: http.get("/model")):
                response = call(headers)
                assert_refused(response, 401, None)
                assert response.headers["www-authenticate"] == "Bearer"
        assert http.post("/predict", json=record(), headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert http.post("/predict", json=record(), headers={"x-api-key": KEY}).status_code == 200


def test_an_api_key_file_others_can_read_or_too_short_is_refused_in_one_line(tmp_path, capsys):
    loose = tmp_path / "loose.key"
    loose.write_text(KEY + "\n")
    loose.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others; run chmod 600"):
        read_api_key(loose)
    assert infer_main(["serve", str(tmp_path), "--api-key-file", str(loose)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fingpt-infer: error:") and KEY not in line
    short = tmp_path / "short.key"
    short.write_text("abc")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="at least 16"):
        read_api_key(short)
    loose.chmod(0o600)
    assert read_api_key(loose) == KEY.encode()
    assert os.stat(loose).st_mode & 0o777 == 0o600


def test_a_cheaper_waiter_gets_the_model_before_an_earlier_costlier_one():
    lock, order = PriorityLock(), []
    assert lock.acquire((0, 0))

    def take(key: tuple[int, int], name: str) -> None:
        assert lock.acquire(key, timeout=30)
        order.append(name)
        lock.release()

    costly = threading.Thread(target=take, args=((1000, 1), "costly"))
    costly.start()
    while len(lock._waiting) < 1:
        time.sleep(0.005)
    cheap = threading.Thread(target=take, args=((3, 2), "cheap"))
    cheap.start()
    while len(lock._waiting) < 2:
        time.sleep(0.005)
    lock.release()
    costly.join(timeout=30)
    cheap.join(timeout=30)
    assert order == ["cheap", "costly"]
    assert lock.acquire((0, 3), timeout=0)  # free again
    lock.release()


def test_a_request_that_cannot_finish_in_time_behind_the_work_ahead_is_refused_at_once():
    scheduler = Scheduler(capacity=8, time_limit_s=30)
    scheduler.seconds_per_unit = 0.01
    first = scheduler.admit(1200)  # nothing ahead: admitted whatever it costs
    second = scheduler.admit(1200)  # 24 s with the first ahead
    with pytest.raises(Busy, match=r"over the time limit of 30 s \(--time-limit-s\)") as refused:
        scheduler.admit(1200)
    assert refused.value.retry_after_s == 24 and refused.value.limit == {"time_limit_s": 30}
    ordinary = scheduler.admit(3)  # nothing cheaper ahead of it: it goes first between chunks
    assert scheduler.in_progress == 3
    scheduler.run(first, 1200, lambda: None)
    assert scheduler.admit(1200).cost == 1200  # the first's work is done: room again
    for job in (first, second, ordinary):
        scheduler.leave(job)
    full = Scheduler(capacity=1)
    full.admit(3)
    with pytest.raises(Busy, match="1 requests in progress") as refused:
        full.admit(3)
    assert refused.value.limit == {"max_in_progress": 1}


def malformed_requests(count: int, seed: int = 0) -> Iterator[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of broken requests: bad JSON, wrong types, odd sizes, nesting, numbers."""
    rng = random.Random(seed)
    valid = json.dumps({"records": [record(SENTINEL)], "mc_samples": 1}).encode()
    fixed: list[bytes] = [
        b"",
        b"null",
        b"[]",
        b'"' + SENTINEL.encode() + b'"',
        b"[" * 5000 + b"]" * 5000,
        b'{"text": "a", "series": [[1e400, 1]]}',
        b'{"text": "a", "series": [[' + b"9" * 400 + b", 1]]}",
        b'{"text": "a", "series": [[1, 2]], "mc_samples": ' + b"9" * 400 + b"}",
        b'{"text": "\\ud800", "series": [[1, 2]]}',
        b'{"text": "a\x00b", "series": [[1, 2]]}',
        b"\xff\xfe" + valid,
        b'{"text": "a", "series": [[1, 2]], "explain": "' + SENTINEL.encode() + b'"}',
        b'{"records": [null], "' + SENTINEL.encode() + b'": {}}',
    ]
    for i in range(count):
        if i < len(fixed):
            body = fixed[i]
        else:  # a valid body with a few bytes flipped, cut or doubled
            body = bytearray(valid)
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(body))
                body[at : at + rng.randint(1, 3)] = bytes(rng.choice(b'{}[]",:0-.e\\ ntxyz\x00\xc3'))
            body = bytes(body[: rng.randint(1, len(body))]) if rng.random() < 0.3 else bytes(body)
        content_type = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])
        method, path = rng.choice([("POST", "/predict")] * 6 + [("GET", "/predict"), ("PUT", "/health")])
        yield method, path, body, {"content-type": content_type} if content_type else {}


def test_no_500_and_no_echo_on_a_batch_of_malformed_requests(http):
    statuses = []
    for method, path, body, headers in malformed_requests(300):
        response = http.request(method, path, content=body, headers=headers)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body[:80], response.text)
        assert response.status_code == 200 or SENTINEL not in response.text
    assert {400, 405, 422} & set(statuses) and 200 not in statuses[:13]


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nX-" + SENTINEL.encode() * 2000 + b": 1\r\n\r\n",
    b"GET /" + SENTINEL.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text": ',  # then the client goes
]


@pytest.mark.parametrize("raw", RAW_REQUESTS)
def test_malformed_http_gets_no_500_and_the_server_stays_up(http, raw):
    host, port = http.base_url.host, http.base_url.port
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.sendall(raw)
        connection.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := connection.recv(65536):
                reply += chunk
    status_line = reply.split(b"\r\n", 1)[0]
    assert not status_line.startswith(b"HTTP/1.1 5"), status_line
    assert SENTINEL.encode() not in reply
    assert http.get("/health").status_code == 200


def test_a_body_that_does_not_arrive_within_the_time_limit_gets_408(service):
    with serving(service, Limits(time_limit_s=0.5)) as http:
        host, port = http.base_url.host, http.base_url.port
        with socket.create_connection((host, port), timeout=10) as connection:
            connection.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text": ')
            reply = connection.recv(65536)  # the client keeps the connection open and sends nothing more
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert b"did not arrive within 0.5 s" in reply
