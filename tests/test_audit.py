"""Audit log: valid JSON lines, stable input hashes, no PII anywhere, whole lines under threads."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from fingpt_federated.privacy import audit
from fingpt_federated.privacy.audit import AuditLog, input_hash, read_audit_log

MODEL_HASH = "sha256:5f1c0a9e7b3d2c4f"
PII = {
    "iban": "DE89 3704 0044 0532 0130 00",
    "card": "4111 1111 1111 1111",
    "email": "jane.doe+alerts@mail.bank.example.com",
    "phone": "+44 20 7946 0958",
    "ssn": "219-09-9999",
}
INPUTS = {
    "text": f"Customer {PII['email']} ({PII['phone']}) disputes a $1,250.50 charge on card {PII['card']}; "
    f"refund to {PII['iban']}, SSN {PII['ssn']}",
    "series": [[101.2, 102.5, 100.9], [1.0, 0.5, 0.25]],
}
OUTPUT = {"label": "fraud", "probabilities": {"fraud": 0.91, "legit": 0.09}, "note": f"flagged for {PII['email']}"}
EXPLANATION = {
    "method": "integrated_gradients",
    "top_tokens": [["jane", 0.31], ["##doe", 0.22], ["41", 0.2], ["##11", 0.18], ["refund", 0.12], ["7946", 0.1]],
    "token_scores": {PII["email"]: 0.4, "charge": 0.05},
    "steps": [{"step": 2, "weight": 0.6}],
    "summary": f"the card {PII['card']} and the IBAN {PII['iban']} drove the score",
}


def _fixed_clock() -> datetime:
    return datetime(2024, 3, 15, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1)))


def _pii_forms() -> set[str]:
    """Each PII value as written and without separators, plus the token pieces of the inputs."""
    forms = set(PII.values()) | {value.replace(" ", "").replace("-", "") for value in PII.values()}
    return forms | {"jane", "doe", "1111", "7946"}


def test_entry_round_trips_with_utc_time_hashes_and_labelled_output(tmp_path):
    log = AuditLog(tmp_path / "audit" / "predictions.jsonl", clock=_fixed_clock)
    entry = log.record(MODEL_HASH, INPUTS, OUTPUT, EXPLANATION)
    assert read_audit_log(log.path) == [entry]
    assert entry["time"] == "2024-03-15T13:30:05.123456+00:00"
    assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0)
    assert entry["model_hash"] == MODEL_HASH
    assert entry["input_hash"] == input_hash(INPUTS)
    assert entry["output"] == {**OUTPUT, "note": "flagged for [EMAIL]"}
    assert entry["explanation"]["steps"] == [{"step": 2, "weight": 0.6}]
    assert entry["explanation"]["method"] == "integrated_gradients"


def test_no_pii_reaches_the_file_from_inputs_outputs_or_explanation_tokens(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    entry = log.record(MODEL_HASH, INPUTS, OUTPUT, EXPLANATION)
    raw = log.path.read_text(encoding="utf-8").replace(entry["input_hash"], "")
    assert [form for form in _pii_forms() if form in raw] == []
    assert entry["explanation"]["top_tokens"] == [
        ["[EMAIL]", 0.31],
        ["[EMAIL]", 0.22],
        ["[CARD]", 0.2],
        ["[CARD]", 0.18],
        ["refund", 0.12],
        ["[PHONE]", 0.1],
    ]
    assert entry["explanation"]["token_scores"] == {"[EMAIL]": 0.4, "charge": 0.05}
    assert entry["explanation"]["summary"] == "the card [CARD] and the IBAN [IBAN] drove the score"


def test_input_hash_is_sha256_of_canonical_json_and_ignores_key_order():
    inputs = {"text": "Zürich branch, Q3 2024", "series": [1.5, 2.0], "bank": 3}
    canonical = '{"bank":3,"series":[1.5,2.0],"text":"Zürich branch, Q3 2024"}'
    assert input_hash(inputs) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert input_hash(dict(reversed(list(inputs.items())))) == input_hash(inputs)
    assert input_hash({**inputs, "series": np.array([1.5, 2.0])}) == input_hash(inputs)
    assert input_hash({**inputs, "bank": 4}) != input_hash(inputs)
    with pytest.raises(TypeError, match="not JSON serialisable"):
        input_hash({"when": object()})


def test_records_append_to_an_existing_log_owner_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record(MODEL_HASH, {"text": "first"}, {"label": "neutral", "probabilities": [0.2, 0.2, 0.6]})
    AuditLog(path).record(MODEL_HASH, {"text": "second"}, {"label": "bullish", "probabilities": [0.1, 0.7, 0.2]})
    assert [e["output"]["label"] for e in read_audit_log(path)] == ["neutral", "bullish"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_fsync_option_syncs_every_record_and_is_off_by_default(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(audit.os, "fsync", synced.append)
    output = {"label": "neutral", "probabilities": [1.0]}
    AuditLog(tmp_path / "a.jsonl").record(MODEL_HASH, {"x": 1}, output)
    assert synced == []
    durable = AuditLog(tmp_path / "b.jsonl", fsync=True)
    durable.record(MODEL_HASH, {"x": 1}, output)
    durable.record(MODEL_HASH, {"x": 2}, output)
    assert len(synced) == 2


def test_invalid_entries_are_refused_before_anything_is_written(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match="probabilities"):
        log.record(MODEL_HASH, {"x": 1}, {"label": "fraud"})
    with pytest.raises(ValueError):
        log.record(MODEL_HASH, {"x": 1}, {"label": "fraud", "probabilities": [float("nan"), 1.0]})
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditLog(log.path, clock=datetime.now).record(MODEL_HASH, {"x": 1}, {"label": "a", "probabilities": [1.0]})
    assert not log.path.exists()


def test_a_damaged_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record(MODEL_HASH, {"x": 1}, {"label": "a", "probabilities": [1.0]})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"time": "2024-03-15T\n')
    with pytest.raises(ValueError, match=r"audit.jsonl:2: not a JSON line"):
        read_audit_log(path)


def test_concurrent_records_from_threads_give_whole_lines(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    threads, per_thread = 6, 25
    padding = "bullish " * 2000  # lines of ~16 KB: larger than one buffered write

    def worker(thread: int) -> None:
        for index in range(per_thread):
            output = {"label": f"t{thread}-{index}", "probabilities": [0.5, 0.5]}
            log.record(MODEL_HASH, {"thread": thread, "index": index}, output, {"summary": padding})

    pool = [threading.Thread(target=worker, args=(thread,)) for thread in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    lines = log.path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == threads * per_thread + 1
    entries = [json.loads(line) for line in lines[:-1]]
    assert {e["output"]["label"] for e in entries} == {f"t{t}-{i}" for t in range(threads) for i in range(per_thread)}
    assert all(e["explanation"]["summary"] == padding for e in entries)
    assert os.path.getsize(log.path) == sum(len(line) + 1 for line in lines[:-1])


def test_pieces_of_names_ips_dates_of_birth_passports_and_sort_codes_are_masked(tmp_path):
    """Issue 24, finding 6: these top tokens reached the log as written (tokens without offsets)."""
    leaked = {
        "acme surged, says Mr John Smith": (["smith", "john", "surged"], "PERSON"),
        "acme plunged after login from 192.168.1.10": (["10", "168", "1", ".", "after"], "IP_ADDRESS"),
        "acme held; client DOB 12/04/1985": (["12", "/", "198", "##5", "held"], "DATE_OF_BIRTH"),
        "acme surged, passport number C01X00T47": (["##x", "##01", "##t", "surged"], "PASSPORT"),
        "acme plunged, sort code 12-34-56 account 87654321": (["-", "56", "876", "##43", "sort"], "ACCOUNT"),
    }
    log = AuditLog(tmp_path / "audit.jsonl")
    for text, (pieces, kind) in leaked.items():
        explanation = {"tokens": [{"token": piece, "score": 0.2} for piece in pieces]}
        entry = log.record(MODEL_HASH, {"text": text}, {"label": "a", "probabilities": [1.0]}, explanation)
        assert [t["token"] for t in entry["explanation"]["tokens"]] == [f"[{kind}]"] * (len(pieces) - 1) + pieces[-1:]
