"""The bank's work on one message: train the global model on its own data, or evaluate it there.

This is what the bank's ClientApp (client/app.py, kept thin) runs, either in its own process (a
simulation's Ray actor, or a deployed bank started with `fingpt-client start --no-worker`) or in
the bank's long-lived worker (client/worker.py, the default of a deployment), which receives the
message content over a private Unix socket. Handlers take and return a RecordDict.

The same code runs in a deployment (node config `data-path`) and in a simulation (a Ray actor
standing in for many banks, found through `partition-id` in the run's FederationSpec). Data and
the model are cached per process: the worker and a simulation actor serve many messages and
rebuilding the backbone for each would dominate a round (with a 7B backbone on a GPU it would
cost minutes and churn GPU memory). The model cache is keyed by the model config, the task shape,
and the backbone's folder and content hash (model/backbone.py), so a checkpoint replaced on disk
is loaded again; it holds the built model, not a second pristine copy of the backbone, so the
weights are in memory once. Every train reply reports `backbone_loads`: how many times this
process loaded a backbone since its previous train reply (1 then 0 in a worker, 1 for every
message of a per-message ClientApp).

One cached model serves every bank of an actor: each message loads the global state into it
and refits the series normaliser and the static features' statistics on that bank's own train
split, so nothing of one bank stays behind for the next.

Differential privacy: when the round config carries a `dp-config`, the bank trains with Opacus
DP-SGD against its own privacy ledger in its state folder (node config `state-dir`, else
`state` beside its data), with its own budget when it sets one (`dp-target-epsilon`, ... in its
node config). A bank whose next round would exceed its budget declines: it replies with a
`status` record instead of a state, the server logs it and goes on with the others. A bank whose
ledger is missing or behind the operator's record of its spend (sent with every train message)
fails the round with how to restore it (privacy/ledger_check.py), never trains on a fresh
budget. Under DP the train loss stays at the bank (it is computed from the records without
noise) and the reply reports epsilon, delta and the noise multiplier instead; for the same reason
an evaluate reply carries metrics of the validation split only where `dp.report_validation`
allows it.

Encryption: when the round config names a CKKS ceremony (`he-fingerprint`), the bank decrypts
the global state it receives onto the initial state it rebuilt, and its train reply carries the
encrypted drift instead of arrays (client/encryption.py).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from transformers import PreTrainedTokenizerBase

from fingpt_federated.client import encryption, feddyn, hostile, scaffold
from fingpt_federated.client.app import planned_steps
from fingpt_federated.client.state_folder import bank_state_dir
from fingpt_federated.client.training import fit_to_bank, private_config, train_local
from fingpt_federated.data.bank_data import BankData, load_bank
from fingpt_federated.federation import protocol, run_inputs
from fingpt_federated.federation.console import quiet_console
from fingpt_federated.federation.federation_spec import BankSite, FederationSpec
from fingpt_federated.federation.protocol import Receipt, RoundTask
from fingpt_federated.model.backbone import backbone_fingerprint, backbone_loads
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.state import federated_state, load_federated_state
from fingpt_federated.model.task_metrics import for_reply
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_budget import BudgetExceeded, ledger_path
from fingpt_federated.privacy.dp_settings import DPSettings, budget_from_flat
from fingpt_federated.privacy.dp_training import DPTask
from fingpt_federated.privacy.ledger_check import open_checked


class SimulatedBankFailure(RuntimeError):
    """Raised by a bank marked `fail` in a simulation's FederationSpec."""


@dataclass
class _Worker:
    """A built model, its tokenizer and its initial federated state, for one (model config, task shape)."""

    key: str
    model: HybridFinGPT
    tokenizer: PreTrainedTokenizerBase
    initial: OrderedDict[str, torch.Tensor]
    initial_hash: str


_worker: _Worker | None = None
_loads_reported = 0


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """The reply content to a `train` or `evaluate` message's content."""
    if kind == "train":
        return train(content, context)
    if kind == "evaluate":
        return evaluate_global(content, context)
    raise ValueError(f"unknown message kind {kind!r} (train or evaluate)")


def preload(node_config: Mapping[str, Any]) -> None:
    """Load and validate a deployed bank's data before the first message (a long-lived worker)."""
    if protocol.NODE_DATA_PATH in node_config:
        _bank(str(node_config[protocol.NODE_DATA_PATH]))


def train(content: RecordDict, context: Context) -> RecordDict:
    """Load the global state, train locally (FedProx when proximal-mu > 0), reply with the new state."""
    task, site, bank, worker = _prepare(content, context)
    cfg = local_train_config(task)
    privacy = bank_privacy(task, site, context)
    if privacy is not None:
        cfg = private_config(cfg, privacy.settings, privacy.server_round)
    planned = planned_steps(len(bank.train), cfg, task.local_steps)
    steps = max(1, math.ceil(site.work * planned))
    anchor = federated_state(worker.model)
    variates = _BankVariates.start(content, task, site, context)
    dynamic = _BankGradient.start(task, site, context, anchor)
    try:
        result = train_local(
            worker.model,
            worker.tokenizer,
            bank.train,
            cfg,
            global_state=anchor,
            proximal_mu=task.proximal_mu if dynamic is None else task.feddyn_alpha,
            drift_correction=None if variates is None else variates.correction(),
            linear_term=None if dynamic is None else dynamic.gradient,
            max_steps=steps,
            privacy=privacy,
        )
    except BudgetExceeded as refused:
        log(WARNING, "bank %s round %d: declines to train: %s", site.name, task.server_round, refused)
        return _declined(site, task, str(refused))
    log(
        INFO,
        "bank %s round %d: %d/%d local steps, loss %.4f",
        site.name,
        task.server_round,
        result.steps,
        planned,
        result.loss,
    )
    examples = hostile.reported_examples(site.hostile, result.examples)  # a simulated hostile bank may lie
    metrics = MetricRecord(
        {
            protocol.NUM_EXAMPLES: examples,
            "train_loss": result.loss if privacy is None else math.nan,
            "local_steps": result.steps,
            "planned_steps": planned,
            "straggler": float(result.steps < planned),
            "seconds": result.seconds,
            "backbone_loads": _new_backbone_loads(),
        }
    )
    if privacy is not None:
        assert result.epsilon is not None and result.noise_multiplier is not None  # train_local's, under privacy
        log(
            INFO,
            "bank %s round %d: epsilon %.4f (delta %g) of its budget %s",
            site.name,
            task.server_round,
            result.epsilon,
            privacy.settings.delta,
            privacy.settings.target_epsilon,
        )
        metrics.update(epsilon=result.epsilon, delta=privacy.settings.delta, noise_multiplier=result.noise_multiplier)
    trained = federated_state(worker.model)
    control = {} if variates is None else variates.finish(anchor, trained, result.steps, cfg.lr, site.hostile)
    if dynamic is not None:
        dynamic.finish(anchor, trained, task.feddyn_alpha)
    return RecordDict(
        {
            **_update(task, site, context, worker, examples, anchor),
            **control,
            protocol.METRICS: metrics,
            protocol.RECEIPT: Receipt(site.name, task.server_round, task.state_hash).to_config(),
        }
    )


@dataclass
class _BankVariates:
    """SCAFFOLD in this round (client/scaffold.py): the server's c, the bank's c_i and where it keeps c_i."""

    server: dict[str, torch.Tensor]
    bank: dict[str, torch.Tensor]
    path: Path

    @classmethod
    def start(cls, content: RecordDict, task: RoundTask, site: BankSite, context: Context) -> _BankVariates | None:
        """The round's variates when the message carries the server's c; None without SCAFFOLD."""
        if protocol.CONTROL not in content.array_records:
            return None
        if task.encrypted:
            raise ValueError("SCAFFOLD's control variates travel in plaintext: not with an encrypted round")
        server = {
            name: value.float()
            for name, value in protocol.record_to_state(content.array_records[protocol.CONTROL]).items()
        }
        path = state_dir(site, context) / "scaffold" / f"{task.control_run or 'run'}.safetensors"
        return cls(server, scaffold.load_variate(path, server), path)

    def correction(self) -> dict[str, torch.Tensor]:
        return scaffold.correction(self.server, self.bank)

    def finish(
        self,
        sent: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        steps: int,
        lr: float,
        hostile_as: str,
    ) -> dict:
        """Keep the bank's new c_i; the reply's record of its change (as a simulated hostile bank sends it)."""
        new = scaffold.updated_variate(self.bank, self.server, sent, trained, steps, lr)
        scaffold.save_variate(self.path, new)
        change = hostile.control_change(hostile_as, {name: new[name] - self.bank[name] for name in new})
        return {protocol.CONTROL_UPDATE: protocol.state_to_record(change)}


@dataclass
class _BankGradient:
    """FedDyn in this round (client/feddyn.py): the bank's g_k and where it keeps it."""

    gradient: dict[str, torch.Tensor]
    path: Path

    @classmethod
    def start(
        cls, task: RoundTask, site: BankSite, context: Context, sent: Mapping[str, torch.Tensor]
    ) -> _BankGradient | None:
        """The bank's g_k when the round is FedDyn's; None otherwise."""
        if task.feddyn_alpha <= 0:
            return None
        if task.encrypted:
            raise ValueError("FedDyn's server correction needs the plaintext average: not with an encrypted round")
        path = state_dir(site, context) / "feddyn" / f"{task.control_run or 'run'}.safetensors"
        return cls(scaffold.load_variate(path, sent), path)

    def finish(self, sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], alpha: float) -> None:
        """Keep the bank's new g_k (nothing travels: the server's h follows from the states)."""
        scaffold.save_variate(self.path, feddyn.updated_gradient(self.gradient, sent, trained, alpha))


def _new_backbone_loads() -> int:
    """Backbone loads of this process since its previous train reply."""
    global _loads_reported
    new = backbone_loads() - _loads_reported
    _loads_reported += new
    return new


def _update(
    task: RoundTask,
    site: BankSite,
    context: Context,
    worker: _Worker,
    examples: int,
    sent: OrderedDict[str, torch.Tensor],
) -> dict:
    """The reply's state: the local state as arrays, or in an encrypted round only its encrypted drift."""
    local = hostile.misbehave(site.hostile, federated_state(worker.model), sent, worker.initial)
    if not task.encrypted:
        return {protocol.ARRAYS: protocol.state_to_record(local)}
    secrets = encryption.bank_secrets(site, context)
    update = encryption.encrypted_update(task, secrets, site.name, local, worker.initial, examples, context.node_id)
    return {protocol.HE_UPDATE: update}


def _global_state(task: RoundTask, site: BankSite, context: Context, worker: _Worker, arrays: ArrayRecord) -> dict:
    """The received global state in plaintext (decrypted onto the rebuilt initial state when encrypted)."""
    if not task.encrypted:
        return protocol.record_to_state(arrays)
    encryption.check_initial(task, worker.initial_hash, site.name)
    secrets = encryption.bank_secrets(site, context)
    return encryption.decrypt_received(task, secrets, site.name, worker.initial, arrays)


def _declined(site: BankSite, task: RoundTask, reason: str) -> RecordDict:
    """A train reply without a state: the bank did not train this round, and why."""
    return RecordDict(
        {
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 0}),
            protocol.RECEIPT: Receipt(site.name, task.server_round, task.state_hash).to_config(),
            protocol.STATUS: ConfigRecord({"status": protocol.DECLINED, "reason": reason}),
        }
    )


def bank_privacy(task: RoundTask, site: BankSite, context: Context) -> DPTask | None:
    """The round's DP task for this bank: its settings (`bank_dp_settings`) and its ledger; None without DP.

    A ledger missing or behind the operator's record of the bank's spend (`task.dp_spent`) is a
    LedgerBehindRecord error, not a decline: the round counts it as this bank's failure (the run
    stops when too few banks remain), and the bank trains again once its ledger is restored.
    """
    settings = bank_dp_settings(task, site, context)
    if settings is None:
        return None
    run = task.dp_run or "run"
    ledger = open_checked(
        ledger_path(state_dir(site, context), run),
        task.dp_spent.get(site.name),
        bank=site.name,
        run=run,
        accountant=settings.accountant,
        delta=settings.delta,
        target_epsilon=settings.target_epsilon,
    )
    return DPTask(settings, ledger, round_label=str(task.server_round), server_round=task.server_round)


def bank_dp_settings(task: RoundTask, site: BankSite, context: Context) -> DPSettings | None:
    """The round's DP settings with the bank's own budget laid over them (its `banks:` entry, then
    its node config); None without DP."""
    if not task.dp or not task.dp.get("enabled", False):
        return None
    return DPSettings.from_mapping(task.dp, bank=site.name, overrides=budget_from_flat(context.node_config))


def reports_validation(task: RoundTask, site: BankSite, context: Context) -> bool:
    """Whether this bank's evaluate reply may carry metrics: always without DP, under DP if it allows."""
    settings = bank_dp_settings(task, site, context)
    return settings is None or settings.report_validation


def state_dir(site: BankSite, context: Context) -> Path:
    """Node config `state-dir`, else `state` inside a prepared bank folder or beside a data config."""
    configured = context.node_config.get(protocol.NODE_STATE_DIR)
    return bank_state_dir(site.path, str(configured) if configured else None)


def evaluate_global(content: RecordDict, context: Context) -> RecordDict:
    """Metrics of the global model on this bank's validation split (never used for training).

    Under DP only with `dp.report_validation` (the bank's own setting wins): otherwise the reply
    holds just the row count, since the metrics would release its validation customers un-noised.
    """
    task, site, bank, worker = _prepare(content, context)
    if bank.valid is None or len(bank.valid) == 0:
        raise ValueError(f"bank {site.name} has no validation rows to evaluate on")
    metrics: dict[str, float] = {}
    if reports_validation(task, site, context):
        batch_size = local_train_config(task).eval_batch_size
        metrics = for_reply(evaluate(worker.model, worker.tokenizer, bank.valid, batch_size))  # ROC-AUC with its share
    return RecordDict(
        {
            # a simulated hostile bank may lie about its count here too: it weighs the validation metrics
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: hostile.reported_examples(site.hostile, len(bank.valid)), **metrics}
            ),
            protocol.RECEIPT: Receipt(site.name, task.server_round, task.state_hash).to_config(),
        }
    )


def local_train_config(task: RoundTask) -> TrainConfig:
    """The model config's `train:` block with the round's local epochs (and local rate when the strategy
    schedules one); no progress bars in a federation."""
    cfg = TrainConfig.from_mapping(task.model_config.get("train") or {})
    lr = cfg.lr if task.local_lr is None else task.local_lr
    return replace(cfg, epochs=task.local_epochs, max_steps=task.local_steps, lr=lr, progress=False)


def bank_site(context: Context) -> BankSite:
    """Where this node's data is: node config `data-path` (deployment) or the run's FederationSpec.

    A deployed bank is named by its node config `bank-name`, else by its data (BankData.name).
    """
    node = context.node_config
    if protocol.NODE_DATA_PATH in node:
        path = str(node[protocol.NODE_DATA_PATH])
        name = str(node.get(protocol.NODE_BANK_NAME, ""))
        return BankSite(path=path, name=name, work=float(node.get(protocol.NODE_LOCAL_WORK, 1.0)))
    spec_path = context.run_config.get(protocol.RUN_SPEC_PATH)
    values = run_inputs.uses_values(context.run_config)
    if protocol.NODE_PARTITION_ID not in node or not (spec_path or values):
        raise ValueError(
            f"this node has no `{protocol.NODE_DATA_PATH}` in its node config and the run has no "
            f"`{protocol.RUN_SPEC_PATH}` for simulated banks: start the SuperNode with "
            f"--node-config '{protocol.NODE_DATA_PATH}=\"/path/to/bank.yaml\"'"
        )
    banks = _spec(str(spec_path)).banks if spec_path else _values_spec(context).banks
    partition = int(node[protocol.NODE_PARTITION_ID])
    if not 0 <= partition < len(banks):
        raise ValueError(f"partition-id {partition} but the federation spec lists {len(banks)} banks")
    return banks[partition]


def _prepare(content: RecordDict, context: Context) -> tuple[RoundTask, BankSite, BankData, _Worker]:
    """Parse the task, find and check the bank's data, and load the global state into the model."""
    quiet_console()
    task = RoundTask.from_config(content.config_records[protocol.CONFIG])
    site = bank_site(context)
    if site.fail:
        raise SimulatedBankFailure(f"bank {site.name}: simulated failure (listed in the federation's fail_banks)")
    arrays = content.array_records[protocol.ARRAYS]
    received = protocol.record_hash(arrays)
    if received != task.state_hash:
        raise ValueError(
            f"bank {site.name}: global state hash {received[:12]} differs from the announced {task.state_hash[:12]}"
        )
    bank = hostile.train_data(site.hostile, _bank(site.path))  # simulation only: a backdoor or canary bank
    if not site.name:
        site = replace(site, name=bank.name)
    if list(bank.train.class_names) != task.class_names:
        raise ValueError(
            f"bank {site.name} has classes {bank.train.class_names}, the federation trains {task.class_names}"
        )
    worker = _model_for(task)
    load_federated_state(worker.model, _global_state(task, site, context, worker, arrays))
    fit_to_bank(worker.model, bank.train)  # the series normaliser and the static features' statistics
    return task, site, bank, worker


def _model_for(task: RoundTask) -> _Worker:
    """The cached model when the task asks for the same one, else a freshly built one (only one is kept).

    The key holds the backbone's resolved folder and content hash: the same name pointing at other
    weights (a checkpoint replaced on disk) builds the model again.
    """
    global _worker
    architecture = {name: value for name, value in task.model_config.items() if name != "train"}
    backbone = backbone_fingerprint(str(task.model_config.get("backbone", "")))
    key = json.dumps([architecture, task.class_names, task.num_features, backbone], sort_keys=True)
    if _worker is None or _worker.key != key:
        _worker = None
        model, tokenizer = build_model(task.model_config, task.num_classes, task.num_features)
        initial = federated_state(model)
        _worker = _Worker(key, model, tokenizer, initial, protocol.record_hash(protocol.state_to_record(initial)))
    return _worker


@lru_cache(maxsize=256)
def _bank(path: str) -> BankData:
    return load_bank(path)


@lru_cache(maxsize=8)
def _spec(path: str) -> FederationSpec:
    return FederationSpec.load(path)


def _values_spec(context: Context) -> FederationSpec:
    """`flwr run .`: the banks prepared from the run config's values, one per simulated SuperNode."""
    num_banks = int(context.node_config[protocol.NODE_NUM_PARTITIONS])
    key = json.dumps({**context.run_config, "num-banks": num_banks}, sort_keys=True, default=str)
    return _prepared_spec(key)


@lru_cache(maxsize=8)
def _prepared_spec(run_config_json: str) -> FederationSpec:
    run_config = json.loads(run_config_json)
    num_banks = int(run_config.pop("num-banks"))
    return run_inputs.prepared_spec(run_inputs.config_from_run(run_config, num_banks), num_banks)
