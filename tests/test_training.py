"""Local (single-bank) training and evaluation of the hybrid model, with tiny backbones."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from functools import cache

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fingpt_federated.client import training
from fingpt_federated.client.proximal import add_proximal_correction
from fingpt_federated.client.training import train_local
from fingpt_federated.data.batching import make_loader
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("tiny_setting")

TINY = {
    "max_length": 16,
    "head_dropout": 0.0,
    "series_encoder": {"d_model": 32, "layers": 1, "heads": 2},
    "fusion": {"d_model": 32, "heads": 2},
}
FAST = TrainConfig(lr=3e-3, batch_size=32, epochs=1, patience=None, progress=False)
FILLERS = ["the", "analyst", "said", "shares", "of", "bank", "today", "market", "report", "EBITDA", "$JPM"]


@cache
def _built(backbone: str, num_features: int, num_classes: int):
    config = {**TINY, "backbone": backbone, "vocabulary": {"trainable_delta": True}}
    return build_model(config, num_classes, num_features)


def built(backbone: str = "tiny-encoder", num_features: int = 2, num_classes: int = 4):
    model, tokenizer = _built(backbone, num_features, num_classes)
    return copy.deepcopy(model), tokenizer


def quadrant_task(n: int, seed: int, steps: int = 10) -> BankDataset:
    """4 classes = (text says up/down) x (series trends up/down), classes balanced.

    Text alone and series alone each tell only which half the class is in (at best 50%);
    only a model that combines both can name the class.
    """
    rng = np.random.default_rng(seed)
    says_up, trend_up = rng.integers(0, 2, n), rng.integers(0, 2, n)
    texts = [" ".join([*rng.choice(FILLERS, 3), "up" if up else "down", *rng.choice(FILLERS, 2)]) for up in says_up]
    returns = rng.normal(0, 0.5, (n, steps)) + np.where(trend_up, 0.5, -0.5)[:, None]
    price = 100 + np.cumsum(returns, axis=1)
    volume = rng.lognormal(10, 1, (n, steps))
    series = np.stack([price, volume], -1).astype(np.float32)
    mask = np.arange(steps)[None] < rng.integers(steps // 2, steps + 1, n)[:, None]
    series[~mask] = 0.0
    return BankDataset(
        texts, series, mask, 2 * says_up + trend_up, ["down-down", "down-up", "up-down", "up-up"], ["price", "volume"]
    )


def text_only(data: BankDataset) -> BankDataset:
    return BankDataset(data.texts, None, None, data.labels, data.class_names)


def series_only(data: BankDataset) -> BankDataset:
    return BankDataset(None, data.series, data.mask, data.labels, data.class_names, data.feature_names)


def distance(a, b) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).pow(2).sum()) for n in a))


def test_training_moves_the_federated_state_and_nothing_else():
    model, tokenizer = built()
    train = quadrant_task(64, seed=0)
    model.fit_normalizer(train.series, train.mask)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    result = train_local(model, tokenizer, train, replace(FAST, epochs=2), max_steps=3)
    after = {name: t.cpu() for name, t in model.state_dict().items()}  # train_local may have moved it to a GPU

    changed = {name for name in before if not torch.equal(before[name], after[name])}
    series_only_path = {"series_proj.weight", "series_proj.bias"}  # unused when text is present
    assert changed == set(federated_state(model)) - series_only_path  # all of it learned, nothing else moved
    frozen = [name for name in before if name.startswith("backbone.") and "lora_" not in name]
    assert len(frozen) > 30 and all(torch.equal(before[n], after[n]) for n in frozen)
    assert (result.steps, result.examples) == (3, 64) and math.isfinite(result.loss)


def test_training_is_seeded():
    train = quadrant_task(64, seed=1)
    states = []
    for _ in range(2):
        model, tokenizer = built()
        train_local(model, tokenizer, train, FAST, max_steps=3)
        states.append(federated_state(model))
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_fusion_uses_the_series():
    """Fused text+series names the class; text alone or series alone cannot beat ~50%."""
    train, valid = quadrant_task(320, seed=2), quadrant_task(160, seed=3)
    cfg = TrainConfig(lr=3e-3, batch_size=32, epochs=4, patience=None, progress=False)
    accuracy = {}
    for name, num_features, pick in [("fused", 2, lambda d: d), ("text", 0, text_only), ("series", 2, series_only)]:
        model, tokenizer = built(num_features=num_features)
        train_local(model, tokenizer, pick(train), cfg)
        accuracy[name] = evaluate(model, tokenizer, pick(valid), 64)["accuracy"]
    assert accuracy["fused"] >= 0.9, accuracy
    assert max(accuracy["text"], accuracy["series"]) <= 0.65, accuracy
    assert accuracy["fused"] - max(accuracy["text"], accuracy["series"]) >= 0.3, accuracy


def test_decoder_path_trains():
    """The causal decoder (q/k/v/o LoRA, last-token pooling) learns the fused task too."""
    model, tokenizer = built("tiny-decoder")
    train, valid = quadrant_task(320, seed=4), quadrant_task(160, seed=5)
    start = federated_state(model)
    cfg = TrainConfig(lr=3e-3, batch_size=32, epochs=4, patience=None, progress=False)
    result = train_local(model, tokenizer, train, cfg, valid=valid)
    moved = federated_state(model)
    assert all(not torch.equal(start[n], moved[n]) for n in moved if ".lora_B." in n)
    assert result.best_valid["accuracy"] >= 0.9, result.history


def test_proximal_correction_pulls_towards_the_global_state():
    train = text_only(quadrant_task(128, seed=5))
    cfg = TrainConfig(
        optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=16, epochs=10, progress=False
    )
    model, tokenizer = built(num_features=0)
    start = federated_state(model)
    huge = 1 / cfg.lr  # the largest stable mu for SGD: every step lands at w_global - lr * grad
    moved = {}
    for mu, steps in [(0.0, 1), (0.0, None), (1.0, None), (huge, None)]:
        local = copy.deepcopy(model)
        train_local(local, tokenizer, train, cfg, global_state=start, proximal_mu=mu, max_steps=steps)
        moved[mu, steps] = distance(federated_state(local), start)
    one_step, free, proximal, pinned = moved.values()
    assert proximal < 0.7 * free, moved
    assert pinned < 0.15 * free and pinned < 2 * one_step, moved


def test_proximal_correction_survives_opacus_replacing_the_gradient():
    """The hook sits on the optimizer Opacus steps after noising, so the correction is not dropped."""
    layer = torch.nn.Linear(3, 2)
    anchor = {name: p.detach() - 1.0 for name, p in layer.named_parameters()}  # w - w_global = 1
    private = GradSampleModule(layer)
    optimizer = DPOptimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4
    )
    handle = add_proximal_correction(optimizer, private, anchor, mu=2.0)
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    (private(torch.randn(4, 3)) * 0.0).sum().backward()  # zero data gradient
    optimizer.step()
    handle.remove()
    for name, p in layer.named_parameters():
        assert torch.allclose(p, before[name] - 0.1 * 2.0 * 1.0)


def test_early_stopping_restores_the_best_validation_state():
    model, tokenizer = built(num_features=0, num_classes=2)
    rng = np.random.default_rng(6)
    noise = text_only(quadrant_task(96, seed=6))
    noise.labels = rng.integers(0, 2, len(noise))  # nothing to learn: validation loss soon rises
    noise.class_names = ["a", "b"]
    train, valid = noise.subset(range(64)), noise.subset(range(64, 96))
    cfg = TrainConfig(lr=3e-2, batch_size=16, epochs=8, patience=1, progress=False)
    result = train_local(model, tokenizer, train, cfg, valid=valid)
    assert result.stopped_early and result.steps < 8 * 4
    assert result.best_valid["loss"] == min(h["loss"] for h in result.history)
    assert evaluate(model, tokenizer, valid, 64)["loss"] == pytest.approx(result.best_valid["loss"], abs=1e-6)


def test_evaluate_reports_roc_auc_for_binary_tasks():
    model, tokenizer = built(num_classes=2)
    data = quadrant_task(40, seed=7)
    binary = BankDataset(data.texts, data.series, data.mask, data.labels % 2, ["down", "up"], data.feature_names)
    model.fit_normalizer(binary.series, binary.mask)
    metrics = evaluate(model, tokenizer, binary, 16)
    assert set(metrics) == {"loss", "accuracy", "macro_f1", "roc_auc"}
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    one_class = binary.subset(np.flatnonzero(binary.labels == 1))
    assert math.isnan(evaluate(model, tokenizer, one_class, 16)["roc_auc"])
    four_classes, _ = built()
    four_classes.fit_normalizer(data.series, data.mask)
    assert 0.0 <= evaluate(four_classes, tokenizer, data, 16)["roc_auc"] <= 1.0  # one-vs-rest macro


def test_normaliser_is_fitted_on_training_data_only():
    model, tokenizer = built()
    train, valid = quadrant_task(64, seed=8), quadrant_task(32, seed=9)
    valid.series[..., 1] *= 1000.0  # a very different validation distribution
    with pytest.raises(RuntimeError, match="normaliser is not fitted"):
        evaluate(model, tokenizer, valid, 16)
    train_local(model, tokenizer, train, FAST, valid=valid, max_steps=2)
    reference, _ = built()
    reference.fit_normalizer(train.series, train.mask)
    assert torch.equal(model.series_encoder.normalizer.mean.cpu(), reference.series_encoder.normalizer.mean)
    assert torch.equal(model.series_encoder.normalizer.std.cpu(), reference.series_encoder.normalizer.std)


def test_train_config_maps_the_yaml_block_and_rejects_unknown_keys():
    assert TrainConfig.from_mapping({"lr": 1e-3, "optimizer": "sgd"}).optimizer == "sgd"
    with pytest.raises(ValueError, match=r"model\.train\.learning_rate: Key 'learning_rate' not in 'TrainConfig'"):
        TrainConfig.from_mapping({"learning_rate": 1e-3})


def test_logit_adjustment_offsets_are_tau_times_the_smoothed_log_prior():
    data = quadrant_task(8, seed=10)
    data = BankDataset(data.texts, None, None, np.array([0, 0, 0, 0, 0, 1, 1, 2]), data.class_names)
    offsets = training.label_prior_offsets(data, 4, 0.5, torch.device("cpu"))
    expected = 0.5 * np.log(np.array([6.0, 3.0, 2.0, 1.0]) / 12.0)
    assert np.allclose(offsets.numpy(), expected)
    assert torch.equal(training.label_prior_offsets(data, 4, 0.0, torch.device("cpu")), torch.zeros(4))


def test_logit_adjustment_keeps_a_skewed_bank_from_learning_its_prior():
    """A bank with 90% of one class: plain CE learns to predict it; the adjusted loss much less."""
    pool = quadrant_task(400, seed=11)
    majority = np.flatnonzero(pool.labels == 0)
    skewed = pool.subset(np.concatenate([majority, np.flatnonzero(pool.labels != 0)[: len(majority) // 9]]))
    balanced = quadrant_task(200, seed=12)

    def majority_share(tau: float) -> float:
        model, tokenizer = built()
        train_local(model, tokenizer, skewed, replace(FAST, logit_adjustment=tau), max_steps=12)
        model.eval()
        with torch.no_grad():
            batch = next(iter(make_loader(balanced, tokenizer, 16, len(balanced), shuffle=False)))
            predicted = model(**batch.to(next(model.parameters()).device).inputs()).argmax(dim=1)
        return float((predicted == 0).float().mean())

    plain, adjusted = majority_share(0.0), majority_share(1.0)
    assert plain > 0.6
    assert adjusted < plain - 0.25
