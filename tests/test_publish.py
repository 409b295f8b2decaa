"""Publishing: the LoRA merge, the precision variants, the model card, and publishing from a real run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from federation_helpers import (
    CLASSES,
    config,
    news_data_overrides,
    tiny_model,
    write_news_csv,
)
from infer_fixtures import EPSILONS, load_table, train_and_publish, write_table
from omegaconf import OmegaConf

from fingpt_federated.infer.cli import main as infer_main
from fingpt_federated.infer.loading import ModelFilesError, open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.model.build import build_model
from fingpt_federated.model.card import (
    CARD_JSON,
    CARD_MD,
    file_hashes,
    model_hash,
)
from fingpt_federated.model.merge import merge_lora
from fingpt_federated.model.quantize import VARIANTS, default_device
from fingpt_federated.server.history import History
from fingpt_federated.server.publish import publish_after_run
from fingpt_federated.simulations.sim import simulate

pytestmark = pytest.mark.usefixtures("tiny_setting")


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_setting):
    return train_and_publish(tmp_path_factory.mktemp("published"), list(VARIANTS))


@pytest.fixture(scope="module")
def test_set(published):
    return load_table(write_table(published.parent / "holdout.csv", 200, seed=3))


def accuracy(folder, variant, data) -> float:
    model, _ = open_model(folder, variant)
    predictions = Predictor(model, batch_size=64).predict(data, explain=False)
    return sum(p.label == CLASSES[y] for p, y in zip(predictions, data.labels, strict=True)) / len(data)


@pytest.mark.parametrize("kind", ["tiny_encoder", "tiny_decoder"])
def test_merged_model_gives_the_adapter_model_outputs(kind):
    model, tokenizer = build_model(tiny_model() | {"backbone": kind.replace("_", "-")}, 3, 2)
    model.fit_normalizer(torch.rand(8, 4, 2).numpy() * 100, torch.ones(8, 4, dtype=torch.bool).numpy())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    tokens = tokenizer(["JPM surged on record profits", "acme slumped"], padding=True, return_tensors="pt")
    series, mask = torch.rand(2, 4, 2) * 100, torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        adapter = model(tokens["input_ids"], tokens["attention_mask"], series, mask)
        lora_off = model.backbone.disable_adapter()
        with lora_off:
            base = model(tokens["input_ids"], tokens["attention_mask"], series, mask)
        merged = merge_lora(model)(tokens["input_ids"], tokens["attention_mask"], series, mask)
    assert (adapter - base).abs().max() > 1e-3  # the adapters matter, so the merge is really tested
    torch.testing.assert_close(merged, adapter, atol=1e-5, rtol=1e-5)
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_every_variant_is_within_one_point_of_fp32_accuracy(published, test_set):
    scores = {variant: accuracy(published, variant, test_set) for variant in VARIANTS}
    assert scores["fp32"] > 0.8, scores  # a trained model, so the comparison means something
    for score in scores.values():
        assert abs(score - scores["fp32"]) <= 0.01, scores


def test_model_card_describes_the_run_and_hashes_every_file(published):
    card = json.loads((published / CARD_JSON).read_text())
    assert card["base_model"]["name"] == "tiny-encoder" and len(card["base_model"]["sha256"]) == 64
    assert card["rounds"] == 2 and card["strategy"]["name"] == "fedprox" and card["strategy"]["mu"] == 0.01
    assert card["banks"] == sorted(EPSILONS)
    assert {bank: s["epsilon"] for bank, s in card["privacy"]["spent"].items()} == EPSILONS
    assert all(s["delta"] == 1e-5 for s in card["privacy"]["spent"].values())
    assert card["metrics"]["test"]["accuracy"] == pytest.approx(0.9) and card["metrics"]["test"]["round"] == 2
    assert card["feature_names"] == ["price", "volume"] and card["class_names"] == CLASSES
    assert card["normalizer"].startswith("fitted on the operator's test inputs (200 records")
    assert card["date"].endswith("+00:00")
    assert set(card["variants"]) == set(VARIANTS)
    sizes = {name: v["bytes"] for name, v in card["variants"].items()}
    assert sizes["bf16"] < 0.6 * sizes["fp32"] and max(sizes.values()) == sizes["fp32"]
    files = file_hashes(published)
    assert card["files"] == files and CARD_JSON not in files and CARD_MD not in files
    assert {
        "manifest.json",
        "hybrid.safetensors",
        "backbone/fp32/model.safetensors",
        "backbone/bnb_nf4/model.safetensors",
        "tokenizer/tokenizer.json",
    } <= set(files)
    assert card["model_hash"] == model_hash(files)
    markdown = (published / CARD_MD).read_text()
    for text in (card["model_hash"], "bank_a: epsilon 2.5", "| bnb_nf4 |", card["base_model"]["sha256"]):
        assert text in markdown


def test_a_modified_file_is_refused_at_load(published, tmp_path):
    copy = shutil.copytree(published, tmp_path / "copy")
    with open(copy / "hybrid.safetensors", "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)  # the byte changed in place (a write after the read appended one)
        handle.write(b"\x00" if last != b"\x00" else b"\x01")
    with pytest.raises(ModelFilesError, match="hybrid.safetensors: sha256 differs"):
        open_model(copy, "fp32")


def test_under_he_the_server_does_not_publish_and_says_who_does(tmp_path):
    cfg = config("privacy=he")
    message = publish_after_run(cfg, None, History(), tmp_path, tmp_path / "global_state.he")
    assert "fingpt-client he-decrypt" in message and f"fingpt-infer publish {tmp_path} --state" in message
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_simulated_run_publishes_and_a_handed_over_state_republishes(tmp_path):
    csv = write_news_csv(tmp_path / "news.csv", rows=240)
    cfg = config(
        *news_data_overrides(csv),
        "federation=iid",
        "federation.num_banks=2",
        "federation.rounds=1",
        "model.train.progress=false",
        "publish.variants=[fp32,int8_dynamic]",
    )
    run = tmp_path / "run"
    simulate(cfg, run, echo=False)
    card = json.loads((run / "model" / CARD_JSON).read_text())
    assert set(card["variants"]) == {"fp32", "int8_dynamic"} and card["rounds"] == 1
    assert card["banks"] and card["metrics"]["test"]["round"] == 1 and card["normalizer"] == "none (a text-only model)"
    assert OmegaConf.load(run / "resolved_config.yaml").publish.variants == ["fp32", "int8_dynamic"]

    handed = shutil.copy(run / "global_state.safetensors", tmp_path / "decrypted.safetensors")
    assert (
        infer_main(
            [
                "publish",
                str(run),
                "--state",
                str(handed),
                "--out",
                str(tmp_path / "bank_model"),
                "--variants",
                "fp32",
                "bf16",
            ]
        )
        == 0
    )
    again = json.loads((tmp_path / "bank_model" / CARD_JSON).read_text())
    assert set(again["variants"]) == {"fp32", "bf16"} and "handed over" in again["state_source"]
    same_weights = "backbone/fp32/model.safetensors"
    assert again["files"][same_weights] == card["files"][same_weights]


def test_every_variant_but_dynamic_int8_goes_to_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert {default_device(variant).type for variant in VARIANTS} == {"cpu"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    devices = {variant: default_device(variant).type for variant in VARIANTS}
    assert devices == {"fp32": "cuda", "bf16": "cuda", "int8_dynamic": "cpu", "bnb_int8": "cuda", "bnb_nf4": "cuda"}
