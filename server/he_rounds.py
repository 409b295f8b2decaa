"""Encrypted rounds: the operator adds the banks' CKKS ciphertexts and never sees an update.

`EncryptedRounds` is a `BankRounds` (loud failures, receipts, declined banks, History) whose
aggregation adds ciphertexts instead of averaging arrays:

- the global "arrays" Flower passes from round to round is one encrypted aggregate (a uint8
  array, `protocol.blob_to_record`), empty before the first round. What it means is in
  privacy/he_global.py: global = the initial state every bank rebuilds + the decrypted mean drift
  of the last round's banks. A bank that skipped rounds gets the latest aggregate like any other.
- `check_update` gates every train reply BEFORE anything is added: no plaintext arrays at all,
  the blob parses and comes from this key ceremony, its header weight is the example count the
  bank reports, its binding names the bank of its receipt, and the `ReplayGuard` accepts the tag
  (authentic under that bank's registered key, this run, this round, the global state sent this
  round, never seen before). A refused update is that bank's failure of the round, with the reason.
- `combine_train` sums the accepted ciphertexts with the PUBLIC context (the constructor refuses
  one holding a secret key); the total weight travels in the aggregate's header.

Binding keys: one random MAC key per bank (`fingpt-client keygen` writes it beside the SuperNode
key), handed to the operator with the bank's public key at registration and looked up by the
bank's registered name. The guard's memory of accepted updates is written atomically after
every acceptance (`guard_path`), so a server restarted in the middle of a round that reruns it
still refuses the updates it had already taken: the rerun round has the same number and global
state, so only that memory tells a replay from a fresh update.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord

from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import Receipt
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.he_aggregate import aggregate
from fingpt_federated.privacy.he_context import HEContext, SecretKeyRefused
from fingpt_federated.privacy.he_packing import EncryptedUpdate
from fingpt_federated.privacy.update_binding import (
    ReplayGuard,
    UpdateBinding,
    UpdateRejected,
)
from fingpt_federated.server.strategy import BankRounds


class EncryptedRounds(BankRounds):
    """BankRounds over encrypted updates; see the module docstring."""

    def __init__(self, *, he: HEContext, guard: ReplayGuard, guard_path: Path | None = None, **kwargs: Any) -> None:
        if he.holds_secret_key or he.context.has_secret_key():
            raise SecretKeyRefused("the operator's strategy got a context holding the secret key; it takes the public one")
        super().__init__(**kwargs)
        self.he = he
        self.guard = guard
        self.guard_path = guard_path

    def check_update(self, reply: Message, server_round: int, state_hash: str) -> str:
        content = reply.content
        if content.array_records:
            return "plaintext arrays in an encrypted round: refused, only ciphertext is aggregated"
        if protocol.HE_UPDATE not in content.config_records:
            return "no encrypted update in the reply"
        record = content.config_records[protocol.HE_UPDATE]
        try:
            blob = record[protocol.HE_CIPHERTEXT]
            if not isinstance(blob, bytes):
                raise TypeError("the ciphertext is not bytes")
            update = EncryptedUpdate.from_bytes(blob)
            update.check_context(self.he)
            binding = UpdateBinding.from_dict(record)
            _check_claims(reply, update, binding)
            self.guard.verify_update(binding, str(record[protocol.HE_TAG]), blob,
                                     server_round=server_round, global_hash=state_hash)
        except (UpdateRejected, ValueError, KeyError, TypeError) as error:
            return f"encrypted update refused: {error}"
        self._save_guard()
        return ""

    def combine_train(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not accepted:
            return None, None
        blobs = [bytes(reply.content.config_records[protocol.HE_UPDATE][protocol.HE_CIPHERTEXT])  # type: ignore[arg-type]
                 for reply in accepted]
        contents = [reply.content for reply in accepted]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)  # type: ignore[attr-defined]
        return protocol.blob_to_record(aggregate(blobs, self.he)), metrics

    def _save_guard(self) -> None:
        if self.guard_path is not None:
            state = {"run": self.guard.run_id, "seen": self.guard.seen()}
            atomic_write_bytes(self.guard_path, json.dumps(state).encode("utf-8"))


def load_guard(path: Path, run_id: str, keys: dict[str, bytes]) -> ReplayGuard:
    """The run's guard, with what it accepted before a restart when `path` holds it."""
    if not path.is_file():
        return ReplayGuard(run_id, keys)
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("run") != run_id:
        raise ValueError(f"{path} belongs to run {state.get('run')!r}, not {run_id!r}")
    return ReplayGuard(run_id, keys, seen=state["seen"])


def _check_claims(reply: Message, update: EncryptedUpdate, binding: UpdateBinding) -> None:
    """The header weight is the reported example count; the binding is for the bank of the receipt."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    examples = None if metrics is None else metrics.get(protocol.NUM_EXAMPLES)
    if examples is None or float(examples) != update.weight or update.summands != 1:
        raise ValueError(f"the ciphertext is weighted {update.weight} x {update.summands}, "
                         f"the reply reports {examples} examples")
    bank = Receipt.from_config(reply.content.config_records[protocol.RECEIPT]).bank
    if binding.node_id != bank:
        raise ValueError(f"the update is bound to bank {binding.node_id!r} but the reply comes from bank {bank!r}")
