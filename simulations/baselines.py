"""What the federation is compared with: one model on all the data, and each bank alone.

Both start from the same initial model as the federation and get the same optimizer-step
budget as the work the federation asked of its banks:
- local-only: a bank trains alone for `rounds` x its per-round local steps;
- centralized: one model trains on the pooled train splits of all banks for as many steps as
  all sampled banks together do over all rounds;
- with static features, classical models on the same rows (simulations/classical_baseline.py):
  logistic regression and gradient boosting, pooled and each bank alone (kind = the model's name).
Every model is scored on the global test set, as the federated model is; a bank alone also on its
own test split when it has one (personalization on: simulations/personalization.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from omegaconf import DictConfig

from fingpt_federated.client.app import planned_steps
from fingpt_federated.client.training import fit_to_bank, train_local
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.features import StaticFeatures
from fingpt_federated.data.records import BankDataset
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate, logits_of, metrics_of
from fingpt_federated.model.state import federated_state, load_federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.simulations.classical_baseline import classical_results

log = logging.getLogger(__name__)

CENTRALIZED = "centralized"
LOCAL = "local-only"


@dataclass(frozen=True)
class BaselineResult:
    kind: str
    bank: str
    steps: int
    train_rows: int
    seconds: float
    test: dict[str, float]
    own_tests: dict[str, dict[str, float]] = field(default_factory=dict)
    """Banks' own test splits, where they have one (bank -> metrics): local-only its own, centralized every bank's."""
    own_predictions: dict[str, list[int]] = field(default_factory=dict)
    """The class predicted for each row of those splits, in order (bank -> classes): the paired test of
    simulations/paired_test.py compares them with the personalised model's, row by row."""

    def to_dict(self) -> dict:
        return asdict(self)


def pooled(datasets: list[BankDataset]) -> BankDataset:
    """The rows of several banks' data sets, one after the other."""
    first = datasets[0]
    has_series = first.series is not None
    return BankDataset(
        texts=None if first.texts is None else _pooled_texts(datasets),
        series=np.concatenate([data.series for data in datasets]) if has_series else None,
        mask=np.concatenate([data.mask for data in datasets]) if has_series else None,
        labels=np.concatenate([data.labels for data in datasets]),
        class_names=list(first.class_names),
        feature_names=list(first.feature_names),
        features=None if first.features is None else _pooled_features(datasets),
    )


def _pooled_features(datasets: list[BankDataset]) -> StaticFeatures:
    parts = [data.features for data in datasets if data.features is not None]
    if len(parts) != len(datasets):
        raise ValueError("cannot pool a data set without static features with data sets that have them")
    return StaticFeatures(
        np.concatenate([part.numeric for part in parts]),
        np.concatenate([part.categorical for part in parts]),
        parts[0].numeric_names,
        parts[0].categorical_names,
    )


def run_baselines(cfg: DictConfig, spec: FederationSpec, threads: int | None = None) -> list[BaselineResult]:
    """Centralized first, then every bank alone; the test set comes from `spec.test_dir`.

    `threads` limits torch's intra-op threads meanwhile: given one simulated bank's CPU share,
    the comparison is fair, and on a small shared machine torch's default of a thread per core
    was measured 7x slower than one thread.
    """
    if not spec.test_dir:
        raise ValueError("baselines need the federation's global test set (spec.test_dir)")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _run_baselines(cfg, spec)
    finally:
        torch.set_num_threads(previous)


def _pooled_texts(datasets: list[BankDataset]) -> list[str]:
    texts: list[str] = []
    for data in datasets:
        if data.texts is None:
            raise ValueError("cannot pool a data set without text with data sets that have text")
        texts.extend(data.texts)
    return texts


def _run_baselines(cfg: DictConfig, spec: FederationSpec) -> list[BaselineResult]:
    model_cfg = config_dict(cfg.model)
    base = TrainConfig.from_mapping(model_cfg.get("train") or {})
    local = replace(base, epochs=int(cfg.strategy.get("local_epochs", 1)), progress=False)
    steps_cap = cfg.strategy.get("local_steps")
    rounds = int(cfg.federation.rounds)
    if spec.test_dir is None:
        raise ValueError("the baselines are scored on the federation's global test set: the spec has no test_dir")
    model, tokenizer = build_model(model_cfg, spec.num_classes, spec.num_features)
    initial = federated_state(model)
    test = load_bank(spec.test_dir).train
    loaded = [(site.name, load_bank(site.path)) for site in spec.banks]
    banks = [(name, bank.train) for name, bank in loaded]
    own_tests = {name: bank.test for name, bank in loaded if bank.test is not None}
    per_round = {name: planned_steps(len(train), local, steps_cap) for name, train in banks}
    fed = cfg.federation
    sampled = max(1, min(len(banks), max(int(len(banks) * float(fed.fraction_train)), int(fed.min_banks))))
    central_steps = round(rounds * sum(per_round.values()) * sampled / len(banks))

    def train_alone(kind: str, name: str, train: BankDataset, steps: int, scored: list[str]) -> BaselineResult:
        log.info("baseline %s (%s): %d steps on %d rows ...", kind, name, steps, len(train))
        load_federated_state(model, initial)
        fit_to_bank(model, train)
        epochs = math.ceil(steps / math.ceil(len(train) / base.batch_size))
        result = train_local(model, tokenizer, train, replace(base, epochs=epochs, progress=False), max_steps=steps)
        metrics = evaluate(model, tokenizer, test, base.eval_batch_size)
        logits = {bank: logits_of(model, tokenizer, own_tests[bank], base.eval_batch_size) for bank in scored}
        own = {bank: metrics_of(logits[bank], np.asarray(own_tests[bank].labels)) for bank in scored}
        predicted = {bank: logits[bank].argmax(dim=1).tolist() for bank in scored}
        log.info("baseline %s (%s): test accuracy %.4f after %.0f s", kind, name, metrics["accuracy"], result.seconds)
        return BaselineResult(kind, name, result.steps, len(train), result.seconds, metrics, own, predicted)

    pool = pooled([train for _, train in banks])
    results = [train_alone(CENTRALIZED, "all banks", pool, central_steps, list(own_tests))]
    results += [
        train_alone(LOCAL, name, train, rounds * per_round[name], [name] if name in own_tests else [])
        for name, train in banks
    ]
    if test.features is not None:
        for kind, bank, rows, seconds, metrics in classical_results(banks, pool, test, int(cfg.get("seed", 0))):
            results.append(BaselineResult(kind, bank, 0, rows, seconds, metrics))
    return results


def mean_local(results: list[BaselineResult], metric: str = "accuracy") -> float:
    values = [r.test[metric] for r in results if r.kind == LOCAL]
    return float(np.mean(values)) if values else math.nan
