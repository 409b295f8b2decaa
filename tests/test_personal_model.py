"""`fingpt-client personalize`: a bank's personalised head on top of the published global model.

The global model is a tiny hybrid model trained and published by the publishing code
(infer_fixtures); the bank's labels lean to one class, so a head that learns its prior does better
on its validation split. The personalised folder is opened and predicted with by fingpt-infer.
"""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import pandas as pd
import pytest
from federation_helpers import CLASSES, news
from infer_fixtures import DATA, train_and_publish
from safetensors.torch import load_file

from fingpt_federated.client.cli import EXIT_INVALID, PERSONAL_MODEL_DIR
from fingpt_federated.client.cli import main as client_main
from fingpt_federated.data.bank_data import BankData, save_bank
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.data.storage import load_records, save_records
from fingpt_federated.infer.cli import main as infer_main
from fingpt_federated.infer.loading import open_model
from fingpt_federated.model.card import CARD_JSON, CARD_MD
from fingpt_federated.model.published import HYBRID_WEIGHTS

pytestmark = pytest.mark.usefixtures("tiny_setting")
LEANING = [0.1, 0.8, 0.1]  # mostly "bullish"


@pytest.fixture(scope="module")
def global_model(tmp_path_factory, tiny_setting):
    return train_and_publish(tmp_path_factory.mktemp("global"), ["fp32"], steps=30)


def bank_table(path, rows: int, seed: int):
    """A CSV in the consortium's data format whose labels lean to one class."""
    data = news(rows, LEANING, seed)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"text": data.texts, "sentiment": [CLASSES[y] for y in data.labels]})
    for columns in DATA["series"]["features"].values():
        for column in columns:
            frame[column] = rng.lognormal(3, 1, rows).round(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def bank(tmp_path):
    def rows(name: str, count: int, seed: int):
        return load_dataset({**DATA, "files": {"train": str(bank_table(tmp_path / f"{name}.csv", count, seed))}})

    return save_bank(BankData("bank_a", rows("train", 160, 11), rows("valid", 60, 12)), tmp_path / "bank_a")


def personalize(global_model, bank, *extra: str) -> int:
    return client_main(["personalize", "--model", str(global_model), "--data", str(bank), "--lr", "0.01", *extra])


def test_personalised_model_is_kept_in_the_state_folder_and_served(global_model, bank, tmp_path, capsys):
    global_card = json.loads((global_model / CARD_JSON).read_text())
    assert personalize(global_model, bank, "--model-hash", global_card["model_hash"]) == 0
    out = bank / "state" / PERSONAL_MODEL_DIR
    printed = capsys.readouterr().out
    assert f"personalised model: {out}" in printed
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # kept: owner-only
    published, card = open_model(out)  # the card's hashes check out
    assert card["model_hash"] != global_card["model_hash"]
    found = card["personalization"]
    assert found["bank"] == "bank_a" and found["global_model_hash"] == global_card["model_hash"]
    assert found["label_prior"] is False
    assert found["valid_personalised"]["loss"] <= found["valid_global"]["loss"]
    assert "without differential privacy" in (out / CARD_MD).read_text()
    ours, theirs = load_file(out / HYBRID_WEIGHTS), load_file(global_model / HYBRID_WEIGHTS)
    changed = {name for name in ours if not (ours[name] == theirs[name]).all()}
    assert any(name.startswith("head.") for name in changed)
    assert not any(name.startswith(("fusion.", "series_proj.", "term_delta.")) for name in changed)
    holdout = bank_table(tmp_path / "holdout.csv", 60, seed=13)
    predictions = tmp_path / "preds.jsonl"
    audit = tmp_path / "audit.jsonl"
    command = ["predict", str(out), str(holdout), "--no-explain", "--out", str(predictions), "--audit-log", str(audit)]
    assert infer_main(command) == 0
    assert len(predictions.read_text().splitlines()) == 60 == len(audit.read_text().splitlines())


def test_the_label_prior_is_fitted_on_request_and_recorded(global_model, bank, tmp_path):
    out = tmp_path / "with_prior"
    assert personalize(global_model, bank, "--label-prior", "--steps", "1", "--out", str(out)) == 0
    _, card = open_model(out)
    found = card["personalization"]
    assert found["label_prior"] is True and found["steps"] == 1
    assert found["valid_personalised"]["loss"] <= found["valid_global"]["loss"]


def test_an_existing_folder_is_never_overwritten(global_model, bank, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert personalize(global_model, bank, "--publish", str(taken)) == EXIT_INVALID
    assert "refusing to overwrite" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]


def test_a_tampered_or_unannounced_global_model_is_refused(global_model, bank, tmp_path, capsys):
    assert personalize(global_model, bank, "--model-hash", "0" * 64) == EXIT_INVALID
    assert "is not the announced" in capsys.readouterr().err
    tampered = tmp_path / "tampered"
    shutil.copytree(global_model, tampered)
    weights = bytearray((tampered / HYBRID_WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    (tampered / HYBRID_WEIGHTS).write_bytes(bytes(weights))
    assert personalize(tampered, bank) == EXIT_INVALID
    assert "sha256 differs from the model card" in capsys.readouterr().err
    assert not (bank / "state").exists() and not list(tmp_path.glob(".personalised-model-*"))


def test_a_head_that_does_worse_is_not_kept(global_model, bank, capsys):
    """Train labels shuffled (a noisy bank): the head fine-tuned on them does worse on the validation split."""
    noisy = load_records(bank / "train")
    noisy.labels = np.random.default_rng(0).permutation(noisy.labels)
    save_records(noisy, bank / "train")
    assert personalize(global_model, bank) == 0
    assert "the global model stays the better one" in capsys.readouterr().out
    assert not (bank / "state").exists()
