"""Encrypted aggregation: the operator adds the banks' BFV or CKKS ciphertexts and never sees an update.

`EncryptedAggregation` wraps a Flower strategy whose aggregation is FedAvg's weighted mean
(FedAvg, FedProx): the wrapped strategy samples the banks, builds the messages and averages the
metrics; the wrapper replaces its `aggregate_train` by the addition of ciphertexts. A strategy
that aggregates otherwise (FedAvgM, FedAdam, FedTrimmedAvg, Krum...) needs the plaintext global
state or the plaintext updates, which the operator never has under HE: it is refused
(`plaintext_aggregation`).

- the global "arrays" Flower passes from round to round is one encrypted aggregate (a uint8
  array, `protocol.blob_to_record`), empty before the first round. What it means is in
  privacy/he_global.py: global = the initial state every bank rebuilds + the decrypted mean drift
  of the last round's banks. A bank that skipped rounds gets the latest aggregate like any other.
- `check_update` gates every train reply BEFORE anything is added (`BankRounds` runs it as its
  `check_update`): no plaintext arrays at all, the blob parses and comes from this key ceremony,
  its header weight is the example count the bank reports, its binding names the bank of its
  receipt and the Flower node the reply came from, and the `ReplayGuard` accepts it (that node is
  the one registered, or first seen, for the bank's name; the tag is authentic under that bank's
  registered key; this run, this round, the global state sent this round, never seen before). A refused update is
  that bank's failure of the round, with the reason.
- `aggregate_train` sums the accepted ciphertexts with the PUBLIC context (the constructor refuses
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
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, Strategy

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
from fingpt_federated.server.strategy_wrapper import StrategyWrapper


def plaintext_aggregation(strategy: type[Strategy]) -> bool:
    """Whether a strategy class aggregates otherwise than FedAvg's weighted mean, which is all that
    adding ciphertexts can compute."""
    return not issubclass(strategy, FedAvg) or strategy.aggregate_train is not FedAvg.aggregate_train


class EncryptedAggregation(StrategyWrapper):
    """A FedAvg-aggregating Flower strategy whose aggregation adds ciphertexts; see the module docstring."""

    strategy: FedAvg

    def __init__(
        self, strategy: Strategy, *, he: HEContext, guard: ReplayGuard, guard_path: Path | None = None
    ) -> None:
        if not isinstance(strategy, FedAvg) or plaintext_aggregation(type(strategy)):
            raise ValueError(
                f"{type(strategy).__name__} aggregates plaintext states, which the server never sees "
                "under HE: only a strategy aggregating as FedAvg does (FedAvg, FedProx) adds ciphertexts"
            )
        if he.holds_secret_key or he.context.has_secret_key():
            raise SecretKeyRefused(
                "the operator's strategy got a context holding the secret key; it takes the public one"
            )
        super().__init__(strategy)
        self.he = he
        self.guard = guard
        self.guard_path = guard_path

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The sum of the replies' ciphertexts (each passed `check_update`) and the wrapped strategy's
        aggregate of their metrics."""
        accepted = list(replies)
        if not accepted:
            return None, None
        blobs = [_ciphertext(reply.content.config_records[protocol.HE_UPDATE]) for reply in accepted]
        metrics = self.strategy.train_metrics_aggr_fn(
            [reply.content for reply in accepted], self.strategy.weighted_by_key
        )
        return protocol.blob_to_record(aggregate(blobs, self.he)), metrics

    def check_update(self, reply: Message, server_round: int, state_hash: str) -> str:
        """Why a train reply's encrypted update must not be added ("" if it may); see the module docstring."""
        content = reply.content
        if content.array_records:
            return "plaintext arrays in an encrypted round: refused, only ciphertext is aggregated"
        if protocol.HE_UPDATE not in content.config_records:
            return "no encrypted update in the reply"
        record = content.config_records[protocol.HE_UPDATE]
        try:
            blob = _ciphertext(record)
            update = EncryptedUpdate.from_bytes(blob)
            update.check_context(self.he)
            binding = UpdateBinding.from_dict(record)
            _check_claims(reply, update, binding)
            self.guard.verify_update(
                binding,
                str(record[protocol.HE_TAG]),
                blob,
                server_round=server_round,
                global_hash=state_hash,
                src_node=reply.metadata.src_node_id,
            )
        except (UpdateRejected, ValueError, KeyError, TypeError) as error:
            return f"encrypted update refused: {error}"
        self._save_guard()
        return ""

    def _save_guard(self) -> None:
        if self.guard_path is not None:
            state = {"run": self.guard.run_id, "seen": self.guard.seen()}
            atomic_write_bytes(self.guard_path, json.dumps(state).encode("utf-8"))


def load_guard(path: Path, run_id: str, keys: dict[str, bytes], nodes: dict[str, int] | None = None) -> ReplayGuard:
    """The run's guard, with what it accepted before a restart when `path` holds it; `nodes`: the
    registered Flower node of each bank name (a deployment's registry)."""
    if not path.is_file():
        return ReplayGuard(run_id, keys, nodes=nodes)
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("run") != run_id:
        raise ValueError(f"{path} belongs to run {state.get('run')!r}, not {run_id!r}")
    return ReplayGuard(run_id, keys, seen=state["seen"], nodes=nodes)


def _ciphertext(record: ConfigRecord) -> bytes:
    blob = record[protocol.HE_CIPHERTEXT]
    if not isinstance(blob, bytes):
        raise TypeError("the ciphertext is not bytes")
    return blob


def _check_claims(reply: Message, update: EncryptedUpdate, binding: UpdateBinding) -> None:
    """The header weight is the reported example count; the binding is for the bank of the receipt."""
    metrics = reply.content.metric_records.get(protocol.METRICS)
    examples = None if metrics is None else metrics.get(protocol.NUM_EXAMPLES)
    if not isinstance(examples, int | float) or float(examples) != update.weight or update.summands != 1:
        raise ValueError(
            f"the ciphertext is weighted {update.weight} x {update.summands}, the reply reports {examples} examples"
        )
    bank = Receipt.from_config(reply.content.config_records[protocol.RECEIPT]).bank
    if binding.node_id != bank:
        raise ValueError(f"the update is bound to bank {binding.node_id!r} but the reply comes from bank {bank!r}")
