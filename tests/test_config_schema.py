"""The config schema (conf/schema.py): wrong keys and types fail at compose time naming the key,
and the defaults the apps compose are the defaults of the code's own dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR, compose_config
from fingpt_federated.conf.schema import Config, FederationConfig, PrivacyConfig, StrategyConfig
from fingpt_federated.data.config import DataConfig
from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.he_context import HEParams


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["data.encodng=latin-1"], "data.encodng"),
        (["data.split.seed=first"], "data.split.seed"),
        (["+data.sep=@"], "data.sep"),
        (["data=credit_taiwan", "data.series.lenght=30"], "data.series.lenght"),
        (["model.lora.rank=4"], "model.lora.rank"),
        (["model.max_length=long"], "model.max_length"),
        (["model.train.lrr=0.1"], "model.train.lrr"),
        (["model.train.epochs=2.5"], "model.train.epochs"),
        (["privacy=dp", "privacy.dp.target_epsilion=3"], "privacy.dp.target_epsilion"),
        (["privacy=dp", "privacy.dp.delta=small"], "privacy.dp.delta"),
        (["privacy.he.poly_modulus=8192"], "privacy.he.poly_modulus"),
        (["privacy.he.max_summands=many"], "privacy.he.max_summands"),
        (["strategy.muu=0.1"], "strategy.muu"),
        (["strategy.local_steps=five"], "strategy.local_steps"),
        (["+strategy.eta=0.1"], "strategy.eta"),
        (["federation.num_bank=3"], "federation.num_bank"),
        (["federation.rounds=3.5"], "federation.rounds"),
        (["+federation.roundz=2"], "federation.roundz"),
        (["simulation.client_cpu=2"], "simulation.client_cpu"),
        (["publish.enabled=perhaps"], "publish.enabled"),
    ],
)
def test_a_wrong_key_or_type_fails_at_compose_naming_the_key(overrides, key):
    with pytest.raises(Exception) as error:  # Hydra's ConfigCompositionException, or ValueError for `+key`
        compose_config(overrides)
    message = str(error.value) + str(error.value.__cause__ or "")
    assert key in message, message


def test_semantic_checks_run_at_compose_time_too():
    with pytest.raises(ValueError, match=r"dp\.delta must be in \(0, 1\)"):
        compose_config(["privacy=dp", "privacy.dp.delta=2"])
    with pytest.raises(ValueError, match="model.quantization must be one of"):
        compose_config(["model.quantization=8bit"])


def test_a_bank_budget_table_entry_may_be_added():
    cfg = compose_config(["privacy=dp", "+privacy.dp.banks.bank_03.target_epsilon=3"])
    assert DPSettings.from_mapping(cfg.privacy.dp, bank="bank_03").target_epsilon == 3.0


def test_the_default_config_is_the_dataclasses_defaults():
    cfg = compose_config(["privacy=dp_he"])
    assert ModelConfig.from_mapping(cfg.model) == ModelConfig()
    assert TrainConfig.from_mapping(cfg.model.train) == TrainConfig()
    dp = DPSettings.from_mapping(cfg.privacy.dp)
    assert dp.lr == DPSettings.lr == 2e-3 and dp == DPSettings(enabled=True)
    assert HEParams.from_config(cfg.privacy.he) == HEParams()
    assert OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FederationConfig), cfg.federation)) == (
        FederationConfig()
    )
    assert cfg.strategy.mu == 0.01 and cfg.strategy.flower == StrategyConfig.flower  # fedprox: FedAvg with mu
    assert OmegaConf.get_type(cfg) is Config and OmegaConf.get_type(cfg.data) is DataConfig


def _leaves(node: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        flat.update(_leaves(value, path + ".") if isinstance(value, dict) else {path: value})
    return flat


@pytest.mark.parametrize(
    ("group", "schema"),
    [("model", Config().model), ("privacy", PrivacyConfig()), ("federation", FederationConfig())],
)
def test_group_files_set_only_what_differs_from_the_schema(group, schema):
    """One source of defaults: a group file that repeats a default would drift from it one day."""
    defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(schema)))
    for path in sorted(Path(CONFIG_DIR / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        values.pop("defaults", None)
        repeated = {key for key, value in _leaves(values).items() if key in defaults and defaults[key] == value}
        assert not repeated, f"{path.name} repeats the schema's defaults {sorted(repeated)}"


def test_publish_defaults_match_the_publisher_until_it_reads_the_schema():
    from fingpt_federated.conf.schema import PublishConfig
    from fingpt_federated.server.publish import PublishSettings

    schema = PublishSettings(PublishConfig.enabled, tuple(PublishConfig().variants), PublishConfig.out)
    assert PublishSettings() == schema == PublishSettings.from_config(compose_config())
