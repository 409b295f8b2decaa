"""The federated state (what travels), its schema checks, and saving/loading a whole model."""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
import torch

from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import (
    StateSchemaError,
    covered_trainable_parameters,
    federated_state,
    load_federated_state,
    load_model,
    save_model,
    state_schema_hash,
)

pytestmark = pytest.mark.usefixtures("tiny_setting")

TINY = {
    "backbone": "tiny-encoder",
    "max_length": 24,
    "series_encoder": {"d_model": 16, "layers": 1, "heads": 2},
    "fusion": {"d_model": 16, "heads": 2},
    "vocabulary": {"trainable_delta": True},
}


@cache
def _built(freeze_lora_a: bool = False):
    return build_model({**TINY, "lora": {"freeze_lora_a": freeze_lora_a}}, 3, 2)


def built(freeze_lora_a: bool = False):
    model, tokenizer = _built(freeze_lora_a)
    return copy.deepcopy(model), tokenizer


def perturbed(state, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in state.items()}


def test_federated_state_is_exactly_the_trainable_tensors_sorted_as_cpu_copies():
    model, _ = built()
    state = federated_state(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert list(state) == sorted(trainable)
    parts = {"backbone", "term_delta", "series_encoder", "fusion", "series_proj", "head"}
    assert {name.split(".")[0] for name in state} == parts
    assert all("lora_" in name for name in state if name.startswith("backbone."))
    assert not any("normalizer" in name for name in state)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    state["head.1.weight"].add_(1.0)
    assert not torch.equal(state["head.1.weight"], model.head[1].weight)


def test_a_term_per_tensor_must_cover_every_trainable_parameter():
    model, _ = built()
    state = federated_state(model)
    assert sorted(covered_trainable_parameters(model, state, "x")) == list(state)
    del state["head.1.bias"]
    with pytest.raises(KeyError, match=r"the drift correction lacks 1 trainable tensor\(s\), e.g. \['head.1.bias'\]"):
        covered_trainable_parameters(model, state, "the drift correction")


def test_freeze_lora_a_keeps_a_out_of_the_state_and_identical_everywhere():
    model, _ = built(freeze_lora_a=True)
    state = federated_state(model)
    assert any(".lora_B." in name for name in state) and not any(".lora_A." in name for name in state)
    torch.manual_seed(12345)  # a bank whose global RNG is elsewhere still draws the same A
    other, _ = build_model({**TINY, "lora": {"freeze_lora_a": True}}, 3, 2)
    a_here = {n: p for n, p in model.named_parameters() if ".lora_A." in n}
    a_there = dict((n, p) for n, p in other.named_parameters() if ".lora_A." in n)
    assert a_here and all(torch.equal(a_here[n], a_there[n]) for n in a_here)


def test_schema_hash_depends_on_names_shapes_and_dtypes_only():
    state = federated_state(built()[0])
    as_numpy = {name: t.numpy() for name, t in state.items()}
    assert state_schema_hash(state) == state_schema_hash(perturbed(state)) == state_schema_hash(as_numpy)
    reshaped = dict(state, **{"head.1.bias": torch.zeros(4)})
    assert state_schema_hash(reshaped) != state_schema_hash(state)
    assert state_schema_hash({k: v.double() for k, v in state.items()}) != state_schema_hash(state)


def test_load_federated_state_accepts_numpy_and_round_trips():
    model, _ = built()
    target = perturbed(federated_state(model))
    load_federated_state(model, {name: t.numpy().astype(np.float64) for name, t in target.items()})
    loaded = federated_state(model)
    assert all(torch.allclose(loaded[n], target[n]) for n in target)


def test_load_federated_state_names_every_problem_and_writes_nothing():
    model, _ = built()
    before = federated_state(model)
    wrong = perturbed(before)
    del wrong["head.1.bias"]
    wrong["head.2.weight"] = torch.zeros(1)
    wrong["series_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(StateSchemaError) as error:
        load_federated_state(model, wrong)
    message = str(error.value)
    assert "missing 1: head.1.bias" in message
    assert "unexpected 1: head.2.weight" in message
    assert "mis-shaped 1: series_proj.weight (model (64, 16), state (3, 3))" in message
    after = federated_state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_save_and_load_give_identical_outputs(tmp_path):
    model, tokenizer = built()
    rng = np.random.default_rng(0)
    series = rng.lognormal(3, 2, size=(16, 6, 2)).astype(np.float32)
    mask = np.ones((16, 6), dtype=bool)
    model.fit_normalizer(series, mask)
    load_federated_state(model, perturbed(federated_state(model), seed=3))
    save_model(model, tmp_path / "saved", metadata={"class_names": ["a", "b", "c"]})

    loaded, loaded_tokenizer = load_model(tmp_path / "saved")
    text = ["EBITDA beat, $JPM up", "CDS widen"]
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = tokenizer(text, padding=True, return_tensors="pt")
    inputs = (ids["input_ids"], ids["attention_mask"], torch.as_tensor(series[:2]), torch.as_tensor(mask[:2]))
    model.eval(), loaded.eval()
    assert torch.equal(model(*inputs), loaded(*inputs))
    assert torch.equal(loaded.series_encoder.normalizer.mean, model.series_encoder.normalizer.mean)


def test_load_model_refuses_weights_of_another_schema(tmp_path):
    model, _ = built()
    save_model(model, tmp_path / "saved")
    other, _ = build_model({**TINY, "lora": {"r": 4}}, 3, 2)
    save_model(other, tmp_path / "other")
    (tmp_path / "other" / "config.json").replace(tmp_path / "saved" / "config.json")
    expected = r"does not fit its config.json: mis-shaped 16: .*lora_A.* \(model \(4, 64\), state \(8, 64\)\)"
    with pytest.raises(StateSchemaError, match=expected):
        load_model(tmp_path / "saved")
