"""`fingpt-infer serve`: the HTTP endpoints through a real client, bad input -> 422 never 500, a real uvicorn."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from federation_helpers import CLASSES
from infer_fixtures import train_and_publish

from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.infer.service import PredictionService
from fingpt_federated.infer.web import create_app
from fingpt_federated.privacy.audit import AuditLog, read_audit_log

pytestmark = pytest.mark.usefixtures("tiny_setting")

SERIES = [[101.5, 2000.0], [99.0, 1800.0], [97.25, 2500.0]]
EMAIL = "jane.doe@examplebank.com"


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_setting):
    root = tmp_path_factory.mktemp("serve")
    published, card = open_model(train_and_publish(root, ["fp32"]), "fp32")
    return PredictionService(Predictor(published), card, AuditLog(root / "audit.jsonl"), cache_size=8)


@pytest.fixture(scope="module")
def client(service):
    with TestClient(create_app(service), raise_server_exceptions=False) as test_client:
        yield test_client


def test_health_and_model_card(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["variant"] == "fp32" and health["model_hash"] == service.model_hash
    card = client.get("/model").json()
    assert card["model_hash"] == service.model_hash and card["class_names"] == CLASSES


def test_single_and_batch_predictions(client):
    single = client.post("/predict", json={"text": "acme surged beat profits", "series": SERIES})
    assert single.status_code == 200, single.text
    (prediction,) = single.json()["predictions"]
    assert prediction["label"] == "bullish" and set(prediction["probabilities"]) == set(CLASSES)
    assert prediction["explanation"]["tokens"] and len(prediction["explanation"]["series_steps"]) == 3
    batch = client.post(
        "/predict",
        json={
            "records": [
                {"text": "acme plunged losses missed", "series": SERIES},
                {"text": "acme held meeting", "series": SERIES[:1]},
            ],
            "explain": False,
            "mc_samples": 2,
        },
    )
    assert batch.status_code == 200, batch.text
    labels = [p["label"] for p in batch.json()["predictions"]]
    assert labels[0] == "bearish" and len(labels) == 2
    assert all("mc_dropout_std" in p["uncertainty"] and p["explanation"] is None for p in batch.json()["predictions"])


def test_repeated_inputs_come_from_the_cache_and_are_still_audited(client, service):
    body = {"text": "acme upgraded record", "series": SERIES}
    before = service.cache.hits
    audited = len(read_audit_log(service.audit.path))
    first, second = client.post("/predict", json=body).json(), client.post("/predict", json=body).json()
    assert first == second and service.cache.hits == before + 1
    assert len(read_audit_log(service.audit.path)) == audited + 2


@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "give either 'text'/'series'/'features' for one prediction or 'records' for a batch"),
        ({"text": "acme", "series": SERIES, "records": [{"text": "acme", "series": SERIES}]}, "not both"),
        ({"text": "acme"}, "this model reads a series"),
        ({"series": SERIES}, "this model reads text"),
        ({"text": "acme", "series": [[1.0, 2.0, 3.0]]}, "'series' step 0 has 3 values; the model takes 2"),
        ({"text": "acme", "series": [[1.0, "NaN"]]}, "finite number"),
        ({"text": "acme", "series": []}, "at least 1 item"),
        ({"text": "", "series": SERIES}, "at least 1 character"),
        ({"text": "acme", "series": SERIES, "colour": "red"}, "unknown key; the keys accepted here are text, series"),
        ({"text": "acme", "series": SERIES, "mc_samples": 1000}, "over the limit of 8 (--max-mc-samples)"),
        ({"records": []}, "at least 1 item"),
        ({"records": [{"text": "acme", "series": [[1.0] * 2] * 300}]}, "limit of 256 steps (--max-series-steps)"),
        ({"text": 7, "series": SERIES}, "valid string"),
    ],
)
def test_bad_input_is_a_422_with_a_clear_message(client, body, message):
    response = client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    assert message in json.dumps(response.json()["detail"])


def test_malformed_json_and_pii_in_bad_input_are_not_echoed(client):
    response = client.post("/predict", content=b'{"text": "acme", ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    response = client.post("/predict", json={"text": 42, "series": SERIES, EMAIL: 1})
    assert response.status_code == 422 and EMAIL not in response.text and "(unknown key)" in response.text


def test_the_audit_log_holds_no_raw_pii(client, service):
    client.post("/predict", json={"text": f"acme surged contact {EMAIL}", "series": SERIES})
    assert "jane.doe" not in service.audit.path.read_text()


def test_openapi_spec_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(spec["paths"])
    assert "PredictRequest" in spec["components"]["schemas"]


def test_through_a_real_uvicorn_on_a_loopback_port(service):
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/health").json()["status"] == "ok"
            reply = http.post("/predict", json={"text": "acme slumped downgraded", "series": SERIES})
            assert reply.status_code == 200 and reply.json()["predictions"][0]["label"] == "bearish"
            assert http.post("/predict", json={"text": "acme"}).status_code == 422
    finally:
        server.should_exit = True
        thread.join(timeout=30)
