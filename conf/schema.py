"""The schema of every command's config, registered in Hydra's ConfigStore as `base_config`.

conf/config.yaml lists `base_config` first in its defaults, so every group option (data, model,
privacy, strategy, federation) and every override is merged into these typed dataclasses: an
unknown key or a value of the wrong type fails when the config is composed, before any bank
starts, naming the key. The dataclasses hold the only copy of each default; the YAML files set
what an option changes. Groups read beside their code (data, model, privacy) are the dataclasses
of that code; the rest are here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.data.config import DataConfig
from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_settings import DPConfig
from fingpt_federated.privacy.he_config import HEConfig
from fingpt_federated.server.best_round import RoundSelection
from fingpt_federated.server.update_checks import UpdateChecks
from fingpt_federated.structured_config import build

SCHEMA_NAME = "base_config"


@dataclass
class ModelGroup(ModelConfig):
    """`model:`: the model (`ModelConfig`) and how it is trained locally (`train:`)."""

    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class PrivacyConfig:
    """`privacy:`: record-level DP inside every bank, and encryption of the updates."""

    dp: DPConfig = field(default_factory=DPConfig)
    he: HEConfig = field(default_factory=HEConfig)


@dataclass
class StrategyConfig:
    """`strategy:`: a Flower strategy and the banks' work per round (checked against the class by the server)."""

    name: str = "fedavg"  # label in reports
    flower: str = "FedAvg"  # class in flwr.serverapp.strategy
    options: dict[str, Any] = field(default_factory=dict)  # keyword args of that class
    mu: float = 0.0  # FedProx proximal term the banks apply
    local_epochs: int = 1
    local_steps: int | None = None
    drop_stragglers: bool = False
    round_timeout: float = 3600.0
    update_checks: UpdateChecks = field(default_factory=UpdateChecks)  # bounds on every plaintext update
    lora_aggregation: str = "mean"  # mean: A, B averaged apart; product: B refitted (server/lora_product.py)
    local_lr_final: float | None = None  # banks' lr: cosine from model.train.lr to this over the rounds; None: constant
    server_lr_final: float | None = None  # FedOpt eta / FedAvgM server_learning_rate: cosine to this; None: constant
    scaffold: bool = False  # SCAFFOLD control variates against client drift (server/scaffold.py, client/scaffold.py)
    feddyn_alpha: float = 0.0  # > 0: FedDyn's dynamic regularisation, this alpha (server/feddyn.py)
    fedexp: bool = False  # FedExP: the server steps past the banks' mean by an eta from their spread (server/fedexp.py)
    fedexp_epsilon: float = 1e-3  # FedExP's epsilon in eta's denominator
    fedexp_max_eta: float = 5.0  # FedExP's eta is capped here: a bank cancelling the others' mean cannot stretch it


@dataclass
class FederationConfig:
    """`federation:`: how the data is dealt out to (simulated) banks, and how the rounds run."""

    partitioner: str = "natural"  # iid | dirichlet | quantity | natural
    key: str | None = "bank"  # natural: the column whose value decides the bank (must be in data.keep_columns)
    bins: list[float] | None = None  # natural: cut a numeric key into bands, e.g. [0, 30, 40, 50, 200] for age
    key_map: dict[Any, str] = field(default_factory=dict)  # natural: key value -> bank; values of one name merge
    other_bank: str | None = None  # natural: values with fewer than min_size rows merge into this bank (logged)
    num_banks: int | None = None  # natural: None = one bank per key value; other partitioners need a number
    alpha: float = 0.5  # dirichlet (label skew) / quantity (size skew): smaller = more skewed
    min_size: int = 10  # no bank gets fewer rows
    valid_fraction: float = 0.15  # each bank's own validation split
    rounds: int = 3
    fraction_train: float = 1.0  # share of banks sampled for training each round
    fraction_evaluate: float = 1.0
    min_banks: int = 2  # a round with fewer successful banks fails the run
    checkpoints_kept: int = 2  # the newest rounds kept in RUN_DIR/checkpoints (at least 1)
    resume_from_round: int | None = None  # resume from this intact checkpoint; later ones are moved aside
    # a deployment's banks folder (WORKDIR/banks; fingpt-server run sets it under TLS): each reply must name the
    # bank its authenticated node is registered as (registry.json), so a bank cannot answer as another
    bank_registry: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoints_kept < 1:
            raise ValueError(f"federation.checkpoints_kept must be at least 1, got {self.checkpoints_kept}")
        if self.resume_from_round is not None and self.resume_from_round < 1:
            raise ValueError(f"federation.resume_from_round must be a round >= 1, got {self.resume_from_round}")


@dataclass
class PublishConfig:
    """`publish:`: the global model after a plaintext run (a state decrypted under HE: fingpt-infer publish)."""

    enabled: bool = True
    variants: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8_dynamic", "bnb_int8", "bnb_nf4"])
    out: str | None = None  # None = RUN_DIR/model
    select: str = "best"  # best: the round best by `monitor` on the banks' validation (server/best_round.py) | last
    monitor: str | None = None  # loss | accuracy | macro_f1 | roc_auc; None = model.train.monitor
    mode: str | None = None  # max | min; None = min for loss, max for the others

    def __post_init__(self) -> None:
        RoundSelection(self.select, self.monitor or "loss", self.mode or "min")  # raises naming the bad setting


@dataclass
class SimulationConfig:
    """`simulation:`: fingpt-sim only (Flower's simulation engine)."""

    client_cpus: int = 1  # CPUs Ray reserves per simulated bank
    client_gpus: float = 0.0  # GPU share per simulated bank (0.25 = four banks per GPU)
    total_cpus: int | None = None  # private Ray: None = all of this machine's
    ray_address: str | None = None  # HOST:PORT of a running Ray cluster's head to run the banks on (docs/scale.md)
    stragglers: float = 0.0  # share of banks that do only part of each round's work (systems heterogeneity)
    straggler_work: float = 0.5  # the part of the local steps a straggler does
    fail_banks: list[int] = field(default_factory=list)  # fault injection: indices of banks whose ClientApp raises
    # hostile banks: bank index -> misbehaviour of its train replies (client/hostile.py), e.g. {0: nan, 1: "scale:100"}
    hostile_banks: dict[int, str] = field(default_factory=dict)
    # true: strategy.update_checks.registered_examples = each prepared bank's train rows (the consortium's registry)
    register_examples: bool = False
    # the report's progress section: the first round (and seconds) the global test accuracy reaches each of
    # these, and each of these shares of the pooled model's accuracy (with baseline=true)
    targets: list[float] = field(default_factory=list)
    pooled_targets: list[float] = field(default_factory=lambda: [0.95, 0.98])

    def __post_init__(self) -> None:
        for name, values in (("targets", self.targets), ("pooled_targets", self.pooled_targets)):
            if any(not 0 < value <= 1 for value in values):
                raise ValueError(f"simulation.{name} must hold accuracies in (0, 1], got {list(values)}")


PERSONALIZED_PARTS = ("head", "head+lora")


@dataclass
class PersonalizeConfig:
    """`personalize:`: fingpt-sim only. After the federation every bank fine-tunes a local part of the final
    global model on its own train split (simulations/personalization.py) and the report compares, on each
    bank's own test split, the global model, the personalised one and the bank alone (with `baseline`)."""

    steps: int = 0  # optimizer steps of each bank's fine-tuning; 0 = no personalization, no own test split
    part: str = "head"  # head: the classification head only (FedRep) | head+lora: also the LoRA adapters
    label_prior: bool = False  # first shift the head's bias to the bank's own label mix (client/personalization.py)
    test_fraction: float = 0.2  # each bank's own test split: this share of its rows, held out before training

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"personalize.steps must be >= 0, got {self.steps}")
        if self.part not in PERSONALIZED_PARTS:
            raise ValueError(f"personalize.part must be one of {PERSONALIZED_PARTS}, got {self.part!r}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"personalize.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class Config:
    """The root: one option of each group, and the settings of the commands."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelGroup = field(default_factory=ModelGroup)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    seed: int = 0
    baseline: bool = False  # fingpt-sim: also train centralized and local-only on the same data, for the report
    publish: PublishConfig = field(default_factory=PublishConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)


def check_config(cfg: DictConfig) -> Config:
    """The composed `cfg` checked against the schema as a whole, with every dataclass's own checks.

    Composition already refuses an unknown key or a wrong type, except where Hydra's `+key=value`
    forces a key in (`+data.sep=@`): that is refused here. Raises ValueError naming the key.
    """
    values = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=False))
    values.pop("hydra", None)
    return build(Config, values, "")


class SchemaCheck(Callback):
    """conf/config.yaml's `hydra.callbacks`: every @hydra.main command checks its config before it starts."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra turns a callback's exception into a warning and runs the job anyway, so a config that
        fails the schema ends the command here, in one line (`fingpt-sim: error: data.sep: ...`), exit 2."""
        try:
            check_config(config)
        except ValueError as error:
            print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
            sys.exit(2)


ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
