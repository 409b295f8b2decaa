"""The dp: config block: the shipped yaml files, validation, and a bank's own budget."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fingpt_federated.client.training import build_optimizer, private_config
from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_settings import DPSettings, budget_from_flat


def _privacy(name: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return OmegaConf.to_container(compose("config", overrides=[f"privacy={name}"]).privacy, resolve=False)


def test_dp_yaml_gives_the_documented_defaults():
    privacy = _privacy("dp")
    settings = DPSettings.from_mapping(privacy["dp"])
    assert settings.enabled and settings.target_epsilon == 8.0 and settings.delta == 1e-5
    assert settings.noise_multiplier is None and settings.accountant == "prv"
    assert (settings.logical_batch_size, settings.physical_batch_size) == (256, 32)
    assert not settings.report_validation  # un-noised validation metrics stay at the bank unless it allows them
    assert not privacy["he"]["enabled"]
    assert settings.lr == 2e-3  # the DP learning rate the apps use, from DPSettings' own default


def test_dp_he_yaml_turns_on_both_layers_with_he_yaml_parameters():
    privacy = _privacy("dp_he")
    assert DPSettings.from_mapping(privacy["dp"]) == DPSettings.from_mapping(_privacy("dp")["dp"])
    assert privacy["he"] == {**_privacy("he")["he"], "enabled": True}


def test_dp_optimizer_lr_and_weight_decay_replace_the_train_config_only_when_set():
    train = TrainConfig(optimizer="adamw", lr=5e-4, batch_size=32, weight_decay=0.01)
    kept = private_config(train, DPSettings(enabled=True, lr=None, logical_batch_size=128))
    assert (kept.optimizer, kept.lr, kept.batch_size, kept.weight_decay) == ("adamw", 5e-4, 128, 0.01)
    private = private_config(
        train, DPSettings(enabled=True, optimizer="sgd", lr=0.5, weight_decay=0.0, logical_batch_size=128)
    )
    assert (private.optimizer, private.lr, private.momentum, private.weight_decay) == ("sgd", 0.5, train.momentum, 0.0)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), private)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["weight_decay"] == 0.0


def test_lr_final_decays_dp_lr_by_a_cosine_over_the_planned_rounds():
    settings = DPSettings(enabled=True, lr=0.7, lr_final=0.3, planned_rounds=5)
    rates = [settings.lr_in_round(r) for r in range(1, 7)]
    assert rates[0] == pytest.approx(0.7) and rates[2] == pytest.approx(0.5) and rates[4] == pytest.approx(0.3)
    assert all(a > b for a, b in zip(rates[:4], rates[1:5], strict=True)) and rates[5] == pytest.approx(0.3)
    train = TrainConfig(optimizer="adamw", lr=5e-4)
    assert private_config(train, settings, server_round=3).lr == pytest.approx(0.5)
    assert private_config(private_config(train, settings, 3), settings, 3).lr == pytest.approx(0.5)  # idempotent
    assert private_config(train, settings).lr == 0.7  # no round known: the constant dp.lr
    assert DPSettings(enabled=True, lr=0.7, planned_rounds=5).lr_in_round(4) == 0.7


def test_none_yaml_disables_dp():
    assert not DPSettings.from_mapping(_privacy("none")["dp"]).enabled


def test_a_bank_sets_its_own_budget_in_the_table_and_in_its_node_config():
    block = {**_privacy("dp")["dp"], "banks": {"bank_03": {"target_epsilon": 3.0, "accountant": "rdp"}}}
    assert DPSettings.from_mapping(block, bank="bank_01").target_epsilon == 8.0
    own = DPSettings.from_mapping(block, bank="bank_03")
    assert (own.target_epsilon, own.accountant) == (3.0, "rdp")
    node = {"data-path": "/x", "dp-target-epsilon": 1.0, "dp-noise-multiplier": 2.5}
    mine = DPSettings.from_mapping(block, bank="bank_03", overrides=budget_from_flat(node))
    assert (mine.target_epsilon, mine.noise_multiplier, mine.accountant) == (1.0, 2.5, "rdp")
    withholding = {**block, "report_validation": True}
    assert not DPSettings.from_mapping(
        withholding, overrides=budget_from_flat({"dp-report-validation": False})
    ).report_validation  # the bank's own choice wins


def test_a_bank_cannot_override_more_than_its_budget():
    with pytest.raises(ValueError, match="may only set"):
        DPSettings.from_mapping({"enabled": True, "banks": {"b": {"enabled": False}}}, bank="b")
    with pytest.raises(ValueError, match="may only set"):
        DPSettings.from_mapping({"enabled": True}, overrides={"max_grad_norm": 100.0})
    with pytest.raises(ValueError, match="not a privacy budget key"):
        budget_from_flat({"dp-target-epsilion": 3.0})


@pytest.mark.parametrize(
    "bad",
    [
        {"delta": 0.0},
        {"target_epsilon": -1.0},
        {"accountant": "gdp"},
        {"physical_batch_size": 512},
        {"target_epsilon": None, "noise_multiplier": None},
        {"max_grad_norm": 0.0},
        {"optimizer": "adam"},
        {"weight_decay": -0.1},
        {"lr": None, "lr_final": 0.1},
        {"lr": 0.5, "lr_final": 0.0},
        {"report_validation": "maybe"},
        {"target_epsilon": "eight"},
        {"unknown_key": 1},
    ],
)
def test_invalid_settings_are_errors(bad):
    with pytest.raises(ValueError):
        DPSettings.from_mapping({"enabled": True, **bad})
