"""`fingpt-infer predict` end to end: a published model and a file in, audited predictions out."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from federation_helpers import CLASSES
from infer_fixtures import load_table, train_and_publish, write_table

from fingpt_federated.infer.cli import main
from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.privacy.audit import read_audit_log

pytestmark = pytest.mark.usefixtures("tiny_setting")

PII_TEXTS = [
    "acme surged call jane.doe@examplebank.com",
    "acme plunged IBAN GB82 WEST 1234 5698 7654 32",
    "acme held card 4111 1111 1111 1111",
]
RAW_PII = ["jane.doe", "examplebank", "GB82", "WEST", "5698", "4111"]


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_setting):
    return train_and_publish(tmp_path_factory.mktemp("published"), ["fp32", "bf16", "int8_dynamic"])


def predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predicts_every_row_with_probabilities_explanation_and_uncertainty(published, tmp_path, capsys):
    table = write_table(tmp_path / "in.csv", 70, seed=4)
    out, audit = tmp_path / "preds.jsonl", tmp_path / "audit.jsonl"
    assert predict(published, table, "--out", out, "--audit-log", audit, "--mc-samples", "3", "--variant", "bf16") == 0
    rows = read_jsonl(out)
    assert [r["row"] for r in rows] == list(range(1, 71)) and all(r["source"] == str(table) for r in rows)
    for r in rows:
        assert r["label"] in CLASSES and sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 0 <= r["uncertainty"]["entropy"] <= 1 and r["uncertainty"]["mc_dropout_std"] >= 0
        assert r["explanation"]["method"] == "input_x_gradient"
        assert 1 <= len(r["explanation"]["tokens"]) <= 5 and len(r["explanation"]["series_steps"]) == 3
        assert sum(abs(t["score"]) for t in r["explanation"]["tokens"]) <= 1 + 1e-6
    accuracy = float(capsys.readouterr().err.split("accuracy ")[1].split()[0])
    assert accuracy > 0.8
    assert len(read_audit_log(audit)) == 70


def test_the_label_column_is_optional_and_jsonl_works(published, tmp_path, capsys):
    csv = write_table(tmp_path / "in.csv", 5, seed=5, labels=False)
    jsonl = tmp_path / "in.jsonl"
    pd.read_csv(csv).to_json(jsonl, orient="records", lines=True)
    assert predict(published, jsonl, "--no-explain", "--audit-log", tmp_path / "audit.jsonl") == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 5 and all("explanation" not in r for r in rows)
    assert "accuracy" not in captured.err


def test_bad_input_is_refused_with_file_row_and_column(published, tmp_path, capsys):
    csv = write_table(tmp_path / "in.csv", 4, seed=6)
    lines = csv.read_text().splitlines()
    cells = lines[3].split(",")
    cells[-2] = "lots"
    lines[3] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    assert predict(published, csv, "--audit-log", tmp_path / "audit.jsonl") == 1
    assert f"{csv}, row 3, column 'v2': value 'lots' is not a finite number" in capsys.readouterr().err
    missing = tmp_path / "missing.csv"
    assert predict(published, missing, "--audit-log", tmp_path / "audit.jsonl") == 1
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "audit.jsonl").exists()


def test_the_audit_log_holds_no_raw_pii(published, tmp_path):
    csv = write_table(tmp_path / "pii.csv", len(PII_TEXTS), seed=7, texts=PII_TEXTS)
    out, audit = tmp_path / "preds.jsonl", tmp_path / "audit.jsonl"
    assert predict(published, csv, "--out", out, "--audit-log", audit) == 0
    logged = audit.read_text()
    assert len(read_audit_log(audit)) == len(PII_TEXTS)
    for raw in RAW_PII:
        assert raw.lower() not in logged.lower(), raw
    for entry in read_audit_log(audit):
        assert len(entry["input_hash"]) == 64 and entry["output"]["label"] in CLASSES
    assert all(raw.lower() not in out.read_text().lower() for raw in ("jane.doe", "examplebank"))


def test_int8_dynamic_is_explained_through_fp32_weights_and_predicts_with_its_own(published, tmp_path):
    """torch's dynamic int8 Linear has no backward: a gradient through it is silently wrong."""
    data = load_table(write_table(tmp_path / "in.csv", 24, seed=6))
    runs = {}
    for variant in ("fp32", "int8_dynamic"):
        model, _ = open_model(published, variant)
        runs[variant] = Predictor(model).predict(data)
    for fp32, int8 in zip(runs["fp32"], runs["int8_dynamic"], strict=True):
        assert int8.explanation == fp32.explanation
        assert int8.probabilities != fp32.probabilities  # predicted by the quantized layers
        assert int8.probabilities == pytest.approx(fp32.probabilities, abs=0.05)
