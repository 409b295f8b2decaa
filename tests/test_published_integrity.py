"""A published folder loads only as its card lists it, with finite weights, and is served only after a self-check.

Issue 24, finding 5: an unlisted `tokenizer/special_tokens_map.json` changed behaviour under the
original model hash, and a card with `"files": {}` verified nothing. Finding 1: a NaN model was
published; `predict` failed with a JSON error and `serve` answered 500 to every /predict.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from federation_helpers import CLASSES
from infer_fixtures import train_and_publish, write_table
from safetensors.torch import load_file, save_file

from fingpt_federated.infer.cli import main as infer_main
from fingpt_federated.infer.inputs import records_to_dataset
from fingpt_federated.infer.loading import ModelFilesError, open_model
from fingpt_federated.infer.predictor import NonFiniteOutputError, Prediction, Predictor
from fingpt_federated.infer.self_check import SelfCheckError, distribution_problem, run_self_check, synthetic_record
from fingpt_federated.model.card import CARD_JSON, file_hashes, model_hash, write_card
from fingpt_federated.model.published import HYBRID_WEIGHTS, NonFiniteWeightsError, variant_files

pytestmark = pytest.mark.usefixtures("tiny_setting")

SPECIAL_TOKENS = "tokenizer/special_tokens_map.json"


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_setting) -> Path:
    return train_and_publish(tmp_path_factory.mktemp("integrity"), ["fp32", "bf16"], steps=20)


@pytest.fixture
def copy(published, tmp_path) -> Path:
    return Path(shutil.copytree(published, tmp_path / "model"))


def card_of(folder: Path) -> dict:
    return json.loads((folder / CARD_JSON).read_text())


def recard(folder: Path) -> dict:
    """Rewrite the card over the folder as it now is: what a publisher of a damaged model would hand over."""
    card = {k: v for k, v in card_of(folder).items() if k not in ("files", "model_hash")}
    return write_card(folder, card)


def test_an_unlisted_tokenizer_file_is_refused_naming_it(copy):
    (copy / SPECIAL_TOKENS).write_text(json.dumps({"unk_token": "[SEP]"}))
    with pytest.raises(ModelFilesError, match=f"{SPECIAL_TOKENS}: not listed in the model card"):
        open_model(copy, "fp32")


def test_a_card_that_lists_the_new_file_under_the_old_hash_is_refused(copy):
    card = card_of(copy)
    (copy / SPECIAL_TOKENS).write_text(json.dumps({"unk_token": "[SEP]"}))
    card["files"] = file_hashes(copy)
    (copy / CARD_JSON).write_text(json.dumps(card))
    with pytest.raises(ModelFilesError, match="model_hash does not match the card's file list"):
        open_model(copy, "fp32")


@pytest.mark.parametrize("files", [{}, None, []])
def test_a_card_that_lists_no_files_is_refused(copy, files):
    card = card_of(copy)
    card["files"] = files
    (copy / CARD_JSON).write_text(json.dumps(card))
    with pytest.raises(ModelFilesError, match="lists no files, so nothing could be verified"):
        open_model(copy, "fp32")


def test_a_missing_file_and_a_linked_file_are_refused(copy, tmp_path):
    (copy / "tokenizer" / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFilesError, match="tokenizer_config.json: listed in the model card but missing"):
        open_model(copy, "fp32")
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (copy / "tokenizer" / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(ModelFilesError, match="tokenizer_config.json: a link inside a published model"):
        open_model(copy, "fp32")


@pytest.mark.parametrize("path", ["tokenizer/added_tokens.json", "backbone/fp32/generation_config.json", ".hidden"])
def test_any_unlisted_file_is_refused(copy, path):
    (copy / path).write_text("{}")
    with pytest.raises(ModelFilesError, match=f"{path}: not listed in the model card"):
        open_model(copy, "fp32")


def test_changing_any_file_the_variant_reads_changes_the_hash_and_is_refused(published, tmp_path):
    listed = card_of(published)["files"]
    read = [p for p in listed if any(p.startswith(prefix) for prefix in variant_files("bf16"))]
    assert {"manifest.json", HYBRID_WEIGHTS, "tokenizer/tokenizer.json", "backbone/bf16/model.safetensors"} <= set(read)
    for path in read:
        damaged = Path(shutil.copytree(published, tmp_path / path.replace("/", "_")))
        with open(damaged / path, "r+b") as handle:  # one byte changed, the size kept
            first = handle.read(1)
            handle.seek(0)
            handle.write(b"{" if first != b"{" else b"[")
        assert model_hash(file_hashes(damaged)) != card_of(published)["model_hash"]
        with pytest.raises(ModelFilesError, match=f"{path}: sha256 differs from the model card"):
            open_model(damaged, "bf16")


def test_another_variants_file_of_another_size_is_refused(copy):
    with open(copy / "backbone" / "bf16" / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelFilesError, match="bf16/model.safetensors: size differs from the model card"):
        open_model(copy, "fp32")


def damage_hybrid(folder: Path, change) -> None:
    tensors = load_file(str(folder / HYBRID_WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / HYBRID_WEIGHTS))
    recard(folder)


def nan_head(tensors: dict[str, torch.Tensor]) -> None:
    tensors["head.1.weight"][0, :10] = float("nan")


def test_nan_weights_are_refused_at_load_naming_the_file(copy):
    damage_hybrid(copy, nan_head)
    with pytest.raises(NonFiniteWeightsError, match=r"hybrid.safetensors: 10 non-finite weight\(s\) in 1 tensor"):
        open_model(copy, "fp32")


def test_nan_backbone_weights_are_refused_at_load(copy):
    path = copy / "backbone" / "fp32" / "model.safetensors"
    tensors = load_file(str(path))
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(path), metadata={"format": "pt"})
    recard(copy)
    with pytest.raises(NonFiniteWeightsError, match=r"backbone/fp32: 1 non-finite weight\(s\)"):
        open_model(copy, "fp32")


def test_predict_and_serve_refuse_a_nan_model_with_one_line(copy, tmp_path, capsys):
    damage_hybrid(copy, nan_head)
    rows = write_table(tmp_path / "rows.csv", 4, seed=5, labels=False)
    audit = str(tmp_path / "audit.jsonl")
    assert infer_main(["predict", str(copy), str(rows), "--audit-log", audit]) == 1
    assert infer_main(["serve", str(copy), "--port", str(free_port()), "--audit-log", audit]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("non-finite weight(s)" in line for line in errors), errors
    assert not Path(audit).exists()


def overflowing_head(folder: Path) -> None:
    """Finite head weights that overflow: 3e38 with the sign of the self-check record's pooled features."""
    published, _ = open_model(folder, "fp32")
    pooled: list[torch.Tensor] = []
    handle = published.model.head[1].register_forward_hook(lambda _m, args, _out: pooled.append(args[0].detach()))
    Predictor(published).predict(records_to_dataset([synthetic_record(published.manifest)], published.manifest))
    handle.remove()
    signs = pooled[0][0].sign()

    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["head.1.weight"] = (3e38 * signs).expand_as(tensors["head.1.weight"]).contiguous()

    damage_hybrid(folder, change)


def test_a_model_with_overflowing_weights_fails_its_self_check_and_serve_does_not_start(copy, tmp_path, capsys):
    overflowing_head(copy)
    published, _ = open_model(copy, "fp32")  # finite weights: the load accepts it
    record = synthetic_record(published.manifest)
    with pytest.raises(NonFiniteOutputError, match="non-finite probabilities"):
        Predictor(published).predict(records_to_dataset([record], published.manifest), explain=False)
    with pytest.raises(SelfCheckError, match="self-check prediction failed"):
        run_self_check(Predictor(published))
    port = free_port()
    assert infer_main(["serve", str(copy), "--port", str(port), "--audit-log", str(tmp_path / "a.jsonl")]) == 1
    (error,) = capsys.readouterr().err.strip().splitlines()
    assert (
        error.startswith("fingpt-infer: error: ")
        and "not served, its self-check prediction failed: the model gave non-finite" in error
    )
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing was bound


def test_an_unfitted_series_normaliser_fails_the_self_check(copy):
    damage_hybrid(copy, lambda tensors: tensors["series_encoder.normalizer.fitted"].fill_(False))
    published, _ = open_model(copy, "fp32")
    with pytest.raises(SelfCheckError, match="the series normaliser is not fitted"):
        run_self_check(Predictor(published))


def test_the_self_check_request_fits_the_model(published):
    model, card = open_model(published, "fp32")
    record = synthetic_record(model.manifest)
    assert record["text"] and len(record["series"]) == model.manifest["model"]["series_encoder"]["max_steps"]
    assert {len(step) for step in record["series"]} == {len(card["feature_names"])}
    capabilities = run_self_check(Predictor(model))
    assert capabilities.classes == CLASSES and capabilities.series and capabilities.text and capabilities.explain


@pytest.mark.parametrize(
    "probabilities, uncertainty, problem",
    [
        ({"bearish": 0.5, "bullish": 0.3, "neutral": 0.2}, {"entropy": 0.9}, None),
        ({"bearish": 0.5, "bullish": 0.3, "neutral": 0.1}, {"entropy": 0.9}, "probabilities sum to 0.900000, not 1"),
        ({"bearish": 1.2, "bullish": -0.2, "neutral": 0.0}, {"entropy": 0.9}, "a negative probability"),
        ({"bearish": 1.0, "bullish": 0.0, "neutral": 0.0}, {"entropy": math.nan}, "non-finite output"),
        ({"bearish": 0.5, "bullish": 0.5}, {"entropy": 0.9}, "expected the classes"),
    ],
)
def test_a_self_check_prediction_must_be_a_distribution_over_the_classes(probabilities, uncertainty, problem):
    found = distribution_problem(Prediction("bearish", probabilities, uncertainty, None), CLASSES)
    assert found == problem if problem is None else problem in found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_serve_reports_what_the_model_can_do_on_health(published, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "fingpt_federated.infer.cli", "serve", str(published), "--variant", "bf16"]
    command += ["--port", str(port), "--audit-log", str(tmp_path / "audit.jsonl")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        health = wait_for_health(server, f"http://127.0.0.1:{port}", log)
    finally:
        server.terminate()
        server.wait(timeout=30)
    card = card_of(published)
    assert health["status"] == "ok" and health["self_check"] == "passed"
    assert health["model_hash"] == card["model_hash"] and health["variant"] == "bf16"
    assert health["classes"] == CLASSES and health["text"] and health["series"] and health["explain"]
    manifest = json.loads((published / "manifest.json").read_text())
    assert health["num_features"] == 2 == manifest["num_features"]
    assert health["max_series_steps"] == manifest["model"]["series_encoder"]["max_steps"]


def wait_for_health(server: subprocess.Popen, url: str, log: Path) -> dict:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"serve exited {server.returncode}: {log.read_text()}")
        try:
            return httpx.get(f"{url}/health", timeout=5).json()
        except httpx.TransportError:
            time.sleep(0.5)
    raise AssertionError("serve did not answer /health within 180 s")
