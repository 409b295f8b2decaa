"""The canary bank's own update in a plaintext run: what a curious operator receives from it.

The simulation keeps the global state of every round (checkpoints), not the banks' replies, so the
auditor repeats the bank's last local round: the global state it was sent (the checkpoint of the round
before, or the initial state), the bank's data with its canaries, the round's local config (epochs,
step cap, optimizer and its seed) through the same `train_local` the bank runs. That is the state the
bank replied with, up to nondeterminism in the backbone's dropout; without DP only. Scored with the
same membership test as the global model (membership.py): it has not been averaged with other banks,
so it carries the canaries at full strength.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from fingpt_federated.client.app import planned_steps
from fingpt_federated.client.training import train_local
from fingpt_federated.data.bank_data import BankData
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state, load_federated_state
from fingpt_federated.model.train_config import TrainConfig


def replayed_update(
    model_cfg: Mapping[str, Any], sent: Mapping[str, Any], bank: BankData, local_epochs: int, local_steps: int | None
) -> dict[str, np.ndarray]:
    """The state a plaintext bank replies with after training on `bank` from the global state `sent`."""
    model, tokenizer = build_model(model_cfg, bank.train.num_classes, 0)
    load_federated_state(model, sent)
    base = TrainConfig.from_mapping(model_cfg.get("train") or {})
    cfg = replace(base, epochs=local_epochs, max_steps=local_steps, progress=False)
    steps = planned_steps(len(bank.train), cfg, local_steps)
    train_local(model, tokenizer, bank.train, cfg, global_state=federated_state(model), max_steps=steps)
    return {name: value.detach().cpu().numpy() for name, value in federated_state(model).items()}
