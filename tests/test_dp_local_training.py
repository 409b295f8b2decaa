"""The local trainer under DP-SGD: the hybrid model (tiny backbones), its ledger, FedProx after the noise."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from fingpt_federated.client import training
from fingpt_federated.client.training import reached_parameters, train_local
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_budget import (
    BudgetExceeded,
    PrivacyLedger,
    ledger_path,
)
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.dp_training import DPTask

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("tiny_setting")]

TINY = {
    "max_length": 16,
    "head_dropout": 0.0,
    "series_encoder": {"d_model": 16, "layers": 1, "heads": 2},
    "fusion": {"d_model": 16, "heads": 2},
}
CFG = TrainConfig(lr=3e-3, batch_size=32, epochs=1, patience=None, progress=False)
WORDS = {
    0: ["plunged", "slumped", "missed", "downgraded"],
    1: ["surged", "beat", "upgraded", "record"],
    2: ["scheduled", "announced", "held", "reported"],
}


@cache
def _built(num_features: int):
    return build_model({**TINY, "backbone": "tiny-encoder"}, 3, num_features)


def built(num_features: int = 0):
    model, tokenizer = _built(num_features)
    return copy.deepcopy(model), tokenizer


def news(n: int, seed: int, *, series: bool = False) -> BankDataset:
    """Headlines whose words give the sentiment away (60% neutral); optionally a noise series beside them."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.2, 0.2, 0.6])
    texts = [" ".join(["acme", *rng.choice(WORDS[int(y)], size=3)]) for y in labels]
    values = rng.normal(size=(n, 5, 2)).astype(np.float32) if series else None
    mask = np.ones((n, 5), dtype=bool) if series else None
    return BankDataset(texts, values, mask, labels, ["bearish", "bullish", "neutral"], ["a", "b"] if series else [])


def dp_task(folder, label: str = "1", **settings) -> DPTask:
    dp = DPSettings(
        **{
            "enabled": True,
            "target_epsilon": 8.0,
            "noise_multiplier": None,
            "accountant": "rdp",
            "logical_batch_size": 64,
            "physical_batch_size": 16,
            "planned_rounds": 1,
            "lr": 1e-2,
            **settings,
        }
    )
    ledger = PrivacyLedger.open(
        ledger_path(folder, "run"),
        run="run",
        accountant=dp.accountant,
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
    )
    return DPTask(dp, ledger, label, seed=0)


def test_dp_training_learns_beyond_the_majority_class_and_reports_the_ledger_epsilon(tmp_path):
    model, tokenizer = built()
    train, valid = news(640, seed=0), news(200, seed=1)
    task = dp_task(tmp_path)
    result = train_local(model, tokenizer, train, replace(CFG, epochs=6), max_steps=60, privacy=task)
    assert result.steps == 60 and result.epsilon == pytest.approx(PrivacyLedger.load(task.ledger.path).epsilon_spent())
    independent = RDPAccountant()
    independent.history = [(result.noise_multiplier, 1 / 10, 60)]
    assert abs(result.epsilon - independent.get_epsilon(delta=1e-5)) < 1e-6 and result.epsilon <= 8.0
    accuracy = evaluate(model, tokenizer, valid)["accuracy"]
    majority = np.bincount(valid.labels).max() / len(valid)
    assert accuracy >= majority + 0.15, (accuracy, majority)


def test_a_round_over_budget_is_refused_before_training(tmp_path):
    model, tokenizer = built()
    before = federated_state(model)
    task = dp_task(tmp_path, target_epsilon=1.0, noise_multiplier=0.6)
    with pytest.raises(BudgetExceeded):
        train_local(model, tokenizer, news(640, seed=0), CFG, max_steps=50, privacy=task)
    after = federated_state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert PrivacyLedger.load(task.ledger.path).steps == 0


def test_text_and_series_data_steps_exactly_the_parameters_it_reaches(tmp_path):
    model, tokenizer = built(num_features=2)
    data = news(200, seed=2, series=True)
    model.fit_normalizer(data.series, data.mask)
    reached = set(reached_parameters(model, data))
    assert reached == set(federated_state(model)) - {"series_proj.weight", "series_proj.bias"}
    before = federated_state(model)
    result = train_local(model, tokenizer, data, CFG, max_steps=3, privacy=dp_task(tmp_path))
    after = federated_state(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == reached and result.steps == 3 and math.isfinite(result.loss)


def test_fedprox_under_dp_changes_the_update(tmp_path):
    start, tokenizer = built()
    data = news(320, seed=3)
    anchor = {name: torch.zeros_like(t) for name, t in federated_state(start).items()}
    states = {}
    for mu in (0.0, 1.0):
        model = copy.deepcopy(start)
        train_local(
            model,
            tokenizer,
            data,
            CFG,
            max_steps=2,
            global_state=anchor,
            proximal_mu=mu,
            privacy=dp_task(tmp_path / str(mu), noise_multiplier=1.0),
        )
        states[mu] = federated_state(model)
    assert all(not torch.equal(states[0.0][n], states[1.0][n]) for n in states[0.0])


def test_logit_adjustment_under_dp_uses_label_counts_released_once_and_charged(tmp_path):
    data = news(640, seed=4)
    true_counts = np.bincount(data.labels, minlength=3)
    histories = []
    for label in ("1", "2"):
        model, tokenizer = built()
        task = dp_task(tmp_path, label, planned_rounds=2, label_prior_noise=5.0)
        result = train_local(model, tokenizer, data, replace(CFG, logit_adjustment=1.0), max_steps=4, privacy=task)
        histories.append(task.ledger.history)
    released = np.asarray(task.ledger.released["label_counts"])
    assert np.all(np.abs(released - true_counts) < 5 * 5.0) and not np.array_equal(released, true_counts)
    # One release at sample rate 1, before the steps of both rounds; the second round did not pay again.
    assert histories[0][0] == histories[1][0] == (release := histories[1][0])
    assert (release.noise_multiplier, release.sample_rate, release.steps) == (5.0, 1.0, 1)
    assert [spend.sample_rate for spend in histories[1]] == [1.0, 1 / 10] and histories[1][1].steps == 8
    independent = RDPAccountant()
    independent.history = [(5.0, 1.0, 1), (result.noise_multiplier, 1 / 10, 8)]
    assert abs(result.epsilon - independent.get_epsilon(delta=1e-5)) < 1e-6 and result.epsilon <= 8.0
    offsets = training.label_prior_offsets(data, 3, 1.0, torch.device("cpu"), task)
    assert np.allclose(offsets.numpy(), np.log((released + 1) / (released + 1).sum()))
