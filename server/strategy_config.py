"""The strategy a config names: a Flower strategy class, its checked options, and this federation's wrappers.

A `conf/strategy/*.yaml` entry:

    name: fedadam            # label in reports and the model card
    flower: FedAdam          # a class of flwr.serverapp.strategy
    options: {eta: 0.01}     # keyword arguments of that class
    mu: 0.0                  # FedProx proximal term the banks apply, with any class (`proximal-mu`)
    local_epochs, local_steps, drop_stragglers, round_timeout: the banks' work and the round's wait
    update_checks: {max_norm: null, max_norm_ratio: 10.0, clip_norm_ratio: null, max_examples_ratio: null}
                             # bounds on plaintext updates (server/update_checks.py)
    lora_aggregation: mean   # or product: LoRA B refitted to the mean of the banks' B·A (server/lora_product.py)
    local_lr_final, server_lr_final: null, or the rates a cosine decays to over the rounds (server/round_schedule.py)
    scaffold: false          # true: SCAFFOLD's control variates correct the banks' drift (server/scaffold.py)
    feddyn_alpha: 0.0        # > 0: FedDyn's dynamic regularisation instead (server/feddyn.py)
    fedexp: false            # true: FedExP's adaptive server step past the banks' mean (server/fedexp.py)

The sampling and minimum arguments (fraction_train, fraction_evaluate, min_*_nodes) come from
`cfg.federation`, so they are refused in `options`; a class that takes `proximal_mu` (FedProx)
gets `strategy.mu`. `check_strategy` checks all of it against the class's signature, and under HE
refuses a class that cannot aggregate ciphertexts, before any bank is prepared. Adding one of
Flower's strategies is one YAML file; the robust ones (FedTrimmedAvg, FedMedian, Krum) are
plaintext only. Every plaintext update passes `UpdateGate` first (server/update_checks.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import flwr.serverapp.strategy as flower_strategies
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.server.bank_rounds import BankRounds
from fingpt_federated.server.encrypted_aggregation import EncryptedAggregation, plaintext_aggregation
from fingpt_federated.server.encrypted_run import EncryptedRun
from fingpt_federated.server.feddyn import FedDyn
from fingpt_federated.server.fedexp import FedExP
from fingpt_federated.server.history import History
from fingpt_federated.server.lora_product import MEAN_STRATEGIES, LoRAProductMean
from fingpt_federated.server.round_schedule import SERVER_RATES, RoundSchedule, server_rate_attribute
from fingpt_federated.server.scaffold import Scaffold
from fingpt_federated.server.update_checks import UpdateChecks, UpdateGate
from fingpt_federated.structured_config import build

FROM_FEDERATION = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)
PROXIMAL_MU = "proximal_mu"
MEAN, PRODUCT = "mean", "product"  # strategy.lora_aggregation


@dataclass(frozen=True)
class StrategyChoice:
    """A checked strategy config: the Flower class and the keyword arguments it is built with."""

    flower: type[Strategy]
    kwargs: dict[str, Any]

    def build(self) -> Strategy:
        return self.flower(**self.kwargs)


def check_strategy(cfg: DictConfig, encrypted: bool) -> StrategyChoice:
    """The Flower class and arguments of `cfg.strategy`, or a ValueError naming the bad key (fingpt-sim and
    fingpt-server call it before any bank is prepared, build_strategy again)."""
    strat = cfg.strategy
    flower = flower_class(str(strat.flower))
    options = OmegaConf.to_container(strat.get("options") or OmegaConf.create({}), resolve=True)
    if not isinstance(options, dict):
        raise ValueError(f"strategy.options must map argument names of {flower.__name__} to values, got {options!r}")
    kwargs = {**federation_kwargs(cfg.federation), **_checked_options(flower, options)}
    if PROXIMAL_MU in inspect.signature(flower).parameters:
        kwargs[PROXIMAL_MU] = float(strat.mu)
    try:
        inspect.signature(flower).bind(**kwargs)
    except TypeError as error:
        raise ValueError(f"strategy.flower={flower.__name__} cannot be built from a strategy config: {error}") from None
    if encrypted and plaintext_aggregation(flower):
        raise ValueError(
            f"strategy={strat.name} needs the plaintext global state or updates (Flower's "
            f"{flower.__name__} aggregates them), which the server never sees under HE (privacy=he or "
            "dp_he): use a strategy that aggregates as FedAvg does, e.g. strategy=fedavg or fedprox"
        )
    checks = update_checks(strat)
    bounded = checks.clip_norm_ratio is not None or checks.max_examples_ratio is not None
    if encrypted and (bounded or checks.registered_examples):
        raise ValueError(
            "strategy.update_checks.clip_norm_ratio / max_examples_ratio / registered_examples bound each bank's "
            "plaintext update and weight, which the server never sees under HE (privacy=he or dp_he): set them "
            "to null / {}"
        )
    if encrypted and strat.get("scaffold", False):
        raise ValueError(
            "strategy.scaffold: SCAFFOLD's control variates are the banks' update directions in plaintext, "
            "which HE (privacy=he or dp_he) is there to hide: use scaffold=false"
        )
    _check_feddyn(strat, encrypted)
    _check_fedexp(strat, flower, encrypted)
    if strat.get("server_lr_final") is not None and server_rate_attribute(flower) is None:
        raise ValueError(
            f"strategy.server_lr_final: Flower's {flower.__name__} takes no server step (none of "
            f"{', '.join(SERVER_RATES)}): use FedAdam, FedYogi, FedAdagrad or FedAvgM, or server_lr_final=null"
        )
    _check_lora_aggregation(str(strat.get("lora_aggregation", MEAN)), flower, encrypted)
    return StrategyChoice(flower, kwargs)


def _check_feddyn(strat: DictConfig, encrypted: bool) -> None:
    alpha = float(strat.get("feddyn_alpha", 0.0))
    if alpha == 0:
        return
    if alpha < 0:
        raise ValueError(f"strategy.feddyn_alpha must be >= 0 (0: no FedDyn), got {alpha}")
    if encrypted:
        raise ValueError("strategy.feddyn_alpha: FedDyn's server correction needs the plaintext average: not with HE")
    if strat.get("scaffold", False):
        raise ValueError("strategy.scaffold and strategy.feddyn_alpha are two drift corrections: choose one")
    if float(strat.get("mu", 0.0)) > 0:
        raise ValueError("strategy.feddyn_alpha: FedDyn's quadratic term is FedProx's with mu = alpha: leave mu at 0")


def _check_fedexp(strat: DictConfig, flower: type[Strategy], encrypted: bool) -> None:
    if not strat.get("fedexp", False):
        return
    if encrypted:
        raise ValueError("strategy.fedexp: FedExP sizes its step from each bank's plaintext update: not with HE")
    if flower is not flower_strategies.FedAvg and flower is not flower_strategies.FedProx:
        raise ValueError(
            f"strategy.fedexp extrapolates FedAvg's mean; Flower's {flower.__name__} aggregates otherwise "
            "(a robust rule or a server optimizer of its own): use strategy=fedavg or fedprox with fedexp"
        )
    if float(strat.get("feddyn_alpha", 0.0)) > 0:
        raise ValueError("strategy.fedexp and strategy.feddyn_alpha both rewrite the server step: choose one")
    if not float(strat.get("fedexp_epsilon", 1e-3)) > 0:
        raise ValueError(f"strategy.fedexp_epsilon must be > 0, got {strat.get('fedexp_epsilon')}")
    if not float(strat.get("fedexp_max_eta", 5.0)) >= 1:
        raise ValueError(f"strategy.fedexp_max_eta must be >= 1 (1: FedAvg), got {strat.get('fedexp_max_eta')}")


def _check_lora_aggregation(how: str, flower: type[Strategy], encrypted: bool) -> None:
    if how not in (MEAN, PRODUCT):
        raise ValueError(f"strategy.lora_aggregation must be {MEAN} or {PRODUCT}, got {how!r}")
    if how == PRODUCT and encrypted:
        raise ValueError(
            "strategy.lora_aggregation=product multiplies each bank's LoRA factors, which the server never "
            "sees under HE (privacy=he or dp_he): use lora_aggregation=mean"
        )
    if how == PRODUCT and flower not in MEAN_STRATEGIES:
        raise ValueError(
            f"strategy.lora_aggregation=product refits the weighted mean of FedAvg or FedProx; Flower's "
            f"{flower.__name__} aggregates otherwise: use lora_aggregation=mean with it"
        )


def update_checks(strategy: DictConfig) -> UpdateChecks:
    """The checked `strategy.update_checks` block (its defaults when the config lacks it)."""
    return build(UpdateChecks, strategy.get("update_checks"), "strategy.update_checks")


def build_strategy(
    cfg: DictConfig,
    history: History,
    round_offset: int = 0,
    encryption: EncryptedRun | None = None,
    registry: Callable[[], Mapping[int, str]] | None = None,
) -> BankRounds:
    """The Flower strategy `cfg.strategy` names inside `BankRounds`; with `encryption`, inside
    `EncryptedAggregation` first (public context, replay guard); `registry` (reads a deployment's
    node id -> registered bank name) binds each node to its bank's name."""
    inner = check_strategy(cfg, encrypted=encryption is not None).build()
    schedule = round_schedule(cfg, inner)
    if cfg.strategy.get("lora_aggregation", MEAN) == PRODUCT:
        inner = LoRAProductMean(inner)
    scaffold = bool(cfg.strategy.get("scaffold", False))
    if scaffold:
        inner = Scaffold(inner)
    if float(cfg.strategy.get("feddyn_alpha", 0.0)) > 0:
        inner = FedDyn(inner, float(cfg.strategy.feddyn_alpha))
    if cfg.strategy.get("fedexp", False):
        inner = FedExP(
            inner, float(cfg.strategy.get("fedexp_epsilon", 1e-3)), float(cfg.strategy.get("fedexp_max_eta", 5.0))
        )
    check_update, update_gate = None, None
    if encryption is not None:
        inner = encrypted = EncryptedAggregation(inner, **encryption.strategy_kwargs())
        check_update = encrypted.check_update
    else:
        update_gate = UpdateGate(update_checks(cfg.strategy), control=scaffold)
    strat = cfg.strategy
    return BankRounds(
        inner,
        min_banks=int(cfg.federation.min_banks),
        history=history,
        round_offset=round_offset,
        drop_stragglers=bool(strat.get("drop_stragglers", False)),
        mu=float(strat.get("mu", 0.0)),
        check_update=check_update,
        update_gate=update_gate,
        schedule=schedule,
        registry=registry,
    )


def round_schedule(cfg: DictConfig, strategy: Strategy) -> RoundSchedule | None:
    """The rates `strategy.local_lr_final` / `server_lr_final` ask for (server/round_schedule.py); None for neither."""
    strat = cfg.strategy
    local_final, server_final = strat.get("local_lr_final"), strat.get("server_lr_final")
    if local_final is None and server_final is None:
        return None
    return RoundSchedule(
        strategy,
        planned_rounds=int(cfg.federation.rounds),
        local_lr=float(cfg.model.train.lr),
        local_lr_final=None if local_final is None else float(local_final),
        server_lr_final=None if server_final is None else float(server_final),
    )


def flower_class(name: str) -> type[Strategy]:
    """The concrete strategy class `name` of flwr.serverapp.strategy."""
    classes = {
        candidate: value
        for candidate in flower_strategies.__all__
        if isinstance(value := getattr(flower_strategies, candidate), type)
        and issubclass(value, Strategy)
        and not inspect.isabstract(value)
    }
    if name not in classes:
        raise ValueError(
            f"strategy.flower must name a strategy of flwr.serverapp.strategy "
            f"({', '.join(sorted(classes))}), got {name!r}"
        )
    return classes[name]


def federation_kwargs(federation: DictConfig) -> dict[str, Any]:
    """Sampling and minimums of every round, from the federation group: at least `min_banks` banks."""
    min_banks = int(federation.min_banks)
    fraction_evaluate = float(federation.get("fraction_evaluate", 1.0))
    return {
        "fraction_train": float(federation.fraction_train),
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_banks,
        "min_evaluate_nodes": min_banks if fraction_evaluate > 0 else 0,
        "min_available_nodes": min_banks,
    }


def _checked_options(flower: type[Strategy], options: dict[Any, Any]) -> dict[str, Any]:
    """`strategy.options`, each key a keyword argument of `flower` that the config does not set elsewhere."""
    parameters = inspect.signature(flower).parameters
    takes = [name for name in parameters if name not in (*FROM_FEDERATION, PROXIMAL_MU)]
    for key in options:
        if key in FROM_FEDERATION:
            raise ValueError(
                f"strategy.options.{key}: set by the federation group (federation.fraction_train, "
                "federation.fraction_evaluate, federation.min_banks), not per strategy"
            )
        if key == PROXIMAL_MU:
            raise ValueError(f"strategy.options.{key}: set strategy.mu, which the banks apply with any strategy")
        if key not in parameters:
            raise ValueError(
                f"strategy.options.{key} is not an argument of Flower's {flower.__name__} (it takes {', '.join(takes)})"
            )
    return {str(key): value for key, value in options.items()}
