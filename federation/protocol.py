"""What the ServerApp and a bank's ClientApp say to each other, in one place.

A train or evaluate message carries the global federated state (ArrayRecord "arrays") and a
ConfigRecord "config" holding a `RoundTask`: everything a bank needs to rebuild the model and
run its share of the round. The bank needs no model config of its own, so every bank trains
exactly the model the operator chose.

A reply carries the bank's metrics (MetricRecord "metrics", with "num-examples" as the FedAvg
weight), its new state for train replies, and a `Receipt` (ConfigRecord "bank"): the bank's name
and the round and global-state hash it worked on. The server drops a reply whose receipt does
not match what it sent, before aggregation.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fingpt_federated.privacy import spend_record
from fingpt_federated.privacy.spend_record import SpentRecord

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
RECEIPT = "bank"
NUM_EXAMPLES = "num-examples"

SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
MODEL_CONFIG = "model-config"
CLASS_NAMES = "class-names"
NUM_FEATURES = "num-features"
STATE_HASH = "state-hash"
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
LOCAL_LR = "local-lr"  # this round's local learning rate (strategy.local_lr_final), replacing model.train.lr
CONTROL = "scaffold-control"  # train message: the server's SCAFFOLD control variate c (an ArrayRecord)
CONTROL_UPDATE = "scaffold-update"  # train reply: the bank's change of its own variate, c_i+ - c_i (an ArrayRecord)
CONTROL_RUN = "scaffold-run"  # train config: the run whose variate the bank keeps (the run folder's name)
FEDDYN_ALPHA = "feddyn-alpha"  # train config: FedDyn's alpha (server/feddyn.py); the bank keeps g_k per CONTROL_RUN
DP_CONFIG = "dp-config"
"""JSON of the federation's `privacy.dp` block (absent: no DP); a bank may lay its own budget over it."""
DP_RUN = "dp-run"
"""Names the run in each bank's privacy ledger: a restarted or resumed run continues the same budget."""
DP_SPENT = "dp-spent"
"""Train messages under DP: the operator's record of what banks spent in the run (privacy/spend_record.py encode);
a bank whose ledger is missing or behind its entry refuses to train."""

HE_FINGERPRINT = "he-fingerprint"
"""Present when the round is encrypted: the fingerprint of the federation's CKKS key ceremony."""
HE_INITIAL_HASH = "he-initial-hash"
"""record_hash of the initial state every bank rebuilds; the global is that state + the decrypted mean drift."""
HE_RUN = "he-run"
"""The run label every encrypted update is bound to (stable across a resumed run)."""
HE_AGGREGATE = "he-aggregate"
"""Name of the one uint8 array of an encrypted global ArrayRecord (empty record: no aggregate yet)."""
HE_UPDATE = "he-update"
"""ConfigRecord of an encrypted train reply: the ciphertext blob (bytes), its binding and tag."""
HE_CIPHERTEXT = "ciphertext"
HE_TAG = "tag"

STATUS = "status"
"""ConfigRecord of a train reply from a bank that did not train: {"status": DECLINED, "reason": ...}."""
DECLINED = "declined"

# Run config (pyproject [tool.flwr.app.config], overridden by `flwr run --run-config`).
RUN_CONFIG_PATH = "config-path"
"""The resolved Hydra config of the run (server side: model, strategy, federation)."""
RUN_SPEC_PATH = "spec-path"
"""A federation.federation_spec.FederationSpec JSON."""
RUN_DIR = "run-dir"
"""Where the ServerApp writes checkpoints, metrics and the final state."""

# Node config of a bank's SuperNode (deployment) or of a simulated node.
NODE_DATA_PATH = "data-path"
NODE_LOCAL_WORK = "local-work"
NODE_BANK_NAME = "bank-name"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"
NODE_STATE_DIR = "state-dir"
"""Where a bank keeps what must survive restarts (its privacy ledger); default: `state` beside its data."""
NODE_HE_CONTEXT = "he-context"
"""The bank's copy of the federation's SECRET CKKS context (he_secret.ctx)."""
NODE_BINDING_KEY = "he-binding-key"
"""The bank's update-binding MAC key file (registered with the operator)."""

TRAIN_METRICS = ("train_loss", "local_steps", "planned_steps", "straggler", "seconds")
"""Metric names of every train reply besides num-examples (FedAvg needs identical keys)."""
DP_METRICS = ("epsilon", "delta", "noise_multiplier")
"""Added to every train reply under DP: the bank's epsilon spent so far in the run, at its delta."""


def _single(key: str, value: object) -> int | float | str | bytes:
    """One value of a ConfigRecord, for int() or float(); a list there is a TypeError naming the key."""
    if not isinstance(value, int | float | str | bytes):
        raise TypeError(f"config value {key!r} must be a single value, got a {type(value).__name__}")
    return value


def _list(key: str, value: object) -> list[Any]:
    """A list value of a ConfigRecord; anything else is a TypeError naming the key."""
    if not isinstance(value, list):
        raise TypeError(f"config value {key!r} must be a list, got a {type(value).__name__}")
    return value


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(dict(state))


def record_to_state(record: ArrayRecord) -> OrderedDict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def record_hash(record: ArrayRecord) -> str:
    """sha256 over every array's name and serialized bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(record):
        digest.update(name.encode())
        digest.update(record[name].data)
    return digest.hexdigest()


def blob_to_record(blob: bytes) -> ArrayRecord:
    """An encrypted aggregate as the global "arrays" Flower's strategies pass around: one uint8 array."""
    return ArrayRecord({HE_AGGREGATE: Array(np.frombuffer(blob, dtype=np.uint8))})


def record_to_blob(record: ArrayRecord) -> bytes | None:
    """The encrypted aggregate in an encrypted global record; None for the empty one (round 1)."""
    if len(record) == 0:
        return None
    if list(record) != [HE_AGGREGATE]:
        raise ValueError(f"an encrypted global holds exactly one array {HE_AGGREGATE!r}, got {sorted(record)}")
    return record[HE_AGGREGATE].numpy().tobytes()


def payload_bytes(content: RecordDict) -> int:
    """Bytes of model state in a message: every array's data and every bytes value of its configs."""
    arrays = sum(len(array.data) for record in content.array_records.values() for array in record.values())
    blobs = sum(
        len(value)
        for record in content.config_records.values()
        for value in record.values()
        if isinstance(value, bytes)
    )
    return arrays + blobs


def task_config(
    model_config: Mapping[str, Any],
    class_names: list[str],
    num_features: int,
    local_epochs: int = 1,
    local_steps: int | None = None,
    dp: Mapping[str, Any] | None = None,
    dp_run: str = "",
    he: Mapping[str, str] | None = None,
    control_run: str = "",
) -> ConfigRecord:
    """The part of a round's config that stays the same every round.

    The strategy adds server-round and proximal-mu (Flower's strategies inject those) and the
    hash of the state it sends.
    """
    config = ConfigRecord(
        {
            MODEL_CONFIG: json.dumps(dict(model_config), sort_keys=True),
            CLASS_NAMES: list(class_names),
            NUM_FEATURES: num_features,
            LOCAL_EPOCHS: local_epochs,
        }
    )
    if local_steps is not None:
        config[LOCAL_STEPS] = local_steps
    if dp is not None:
        config[DP_CONFIG] = json.dumps(dict(dp), sort_keys=True)
        config[DP_RUN] = dp_run
    for key, value in (he or {}).items():
        config[key] = value
    if control_run:
        config[CONTROL_RUN] = control_run
    return config


@dataclass(frozen=True)
class RoundTask:
    """A bank's reading of the "config" ConfigRecord of a train or evaluate message."""

    server_round: int
    model_config: dict[str, Any]
    class_names: list[str]
    num_features: int
    state_hash: str
    local_epochs: int = 1
    local_steps: int | None = None
    proximal_mu: float = 0.0
    local_lr: float | None = None
    """This round's local learning rate when the strategy schedules one (None: model.train.lr)."""
    dp: dict[str, Any] | None = None
    dp_run: str = ""
    dp_spent: dict[str, SpentRecord] = field(default_factory=dict)
    """The operator's record of the banks' privacy spend in the run ({} when it has none)."""
    he_fingerprint: str = ""
    he_initial_hash: str = ""
    he_run: str = ""
    control_run: str = ""
    """SCAFFOLD and FedDyn: the run whose control variate or g_k the bank keeps ("" without either)."""
    feddyn_alpha: float = 0.0
    """FedDyn's alpha (0: no FedDyn)."""

    @classmethod
    def from_config(cls, config: ConfigRecord) -> RoundTask:
        required = (SERVER_ROUND, MODEL_CONFIG, CLASS_NAMES, NUM_FEATURES, STATE_HASH)
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"round config lacks {missing}: was it sent by the fingpt-federated ServerApp?")
        steps = config.get(LOCAL_STEPS)
        return cls(
            server_round=int(_single(SERVER_ROUND, config[SERVER_ROUND])),
            model_config=json.loads(str(config[MODEL_CONFIG])),
            class_names=[str(name) for name in _list(CLASS_NAMES, config[CLASS_NAMES])],
            num_features=int(_single(NUM_FEATURES, config[NUM_FEATURES])),
            state_hash=str(config[STATE_HASH]),
            local_epochs=int(_single(LOCAL_EPOCHS, config.get(LOCAL_EPOCHS, 1))),
            local_steps=None if steps is None else int(_single(LOCAL_STEPS, steps)),
            proximal_mu=float(_single(PROXIMAL_MU, config.get(PROXIMAL_MU, 0.0))),
            local_lr=float(_single(LOCAL_LR, config[LOCAL_LR])) if LOCAL_LR in config else None,
            dp=json.loads(str(config[DP_CONFIG])) if DP_CONFIG in config else None,
            dp_run=str(config.get(DP_RUN, "")),
            dp_spent=spend_record.decode(str(config[DP_SPENT])) if DP_SPENT in config else {},
            he_fingerprint=str(config.get(HE_FINGERPRINT, "")),
            he_initial_hash=str(config.get(HE_INITIAL_HASH, "")),
            he_run=str(config.get(HE_RUN, "")),
            control_run=str(config.get(CONTROL_RUN, "")),
            feddyn_alpha=float(_single(FEDDYN_ALPHA, config.get(FEDDYN_ALPHA, 0.0))),
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def encrypted(self) -> bool:
        return bool(self.he_fingerprint)


@dataclass(frozen=True)
class Receipt:
    """Who answered, and to which round and global state."""

    bank: str
    server_round: int
    state_hash: str

    def to_config(self) -> ConfigRecord:
        return ConfigRecord({"name": self.bank, SERVER_ROUND: self.server_round, STATE_HASH: self.state_hash})

    @classmethod
    def from_config(cls, config: ConfigRecord) -> Receipt:
        return cls(str(config["name"]), int(_single(SERVER_ROUND, config[SERVER_ROUND])), str(config[STATE_HASH]))
