"""What every strategy of this federation adds to Flower's: loud rounds, per-bank metrics, resume.

Flower's FedAvg-family strategies aggregate whatever replies arrive and log failures at INFO;
a round where every bank crashed still "completes". `BankRounds` wraps their hooks (it does
not re-implement aggregation):

- configure_*: stamps the hash of the global state being sent into the round config, numbers
  rounds globally (a resumed run continues at round k+1, not at 1);
- aggregate_*: checks every reply (error, stale receipt, straggler to drop), logs each failed
  bank with its reason at WARNING, raises `FederationRoundError` listing all reasons when fewer
  banks than the minimum succeeded, records every bank's metrics in the run's History, and only
  then hands the accepted replies to the aggregation (`combine_train`: Flower's, unless a subclass
  such as server/he_rounds.py replaces it; `check_update` is its per-update gate, run before any
  aggregation and counted as a failure of that bank). A bank that declined to train (its
  privacy budget is spent) is logged and recorded as "declined", not as a failure: the minimum
  counts the banks that could train, and a round where none could leaves the global state as is.
  Evaluation averages the replies that carry metrics: under DP a bank may answer with its row
  count alone (dp.report_validation).

Each round's aggregated metrics also count model-state bytes on the wire, for the report:
`upload_bytes` (accepted train replies) and `download_bytes` (the train, resp. evaluate,
messages sent).

Concrete strategies (server/fedavg.py, server/fedprox.py, server/fedavgm.py) put this mixin in front
of Flower's class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import Receipt
from fingpt_federated.server.history import FEDERATION, History


class FederationRoundError(RuntimeError):
    """Fewer banks than the configured minimum completed a round: the run must stop."""


class BankRounds:
    """Mixin for a Flower FedAvg-family strategy; see the module docstring."""

    def __init__(
        self,
        *,
        min_banks: int,
        history: History,
        round_offset: int = 0,
        drop_stragglers: bool = False,
        **strategy_kwargs: Any,
    ) -> None:
        if min_banks < 1:
            raise ValueError(f"min_banks must be at least 1, got {min_banks}")
        super().__init__(**strategy_kwargs)
        self.min_banks = min_banks
        self.history = history
        self.round_offset = round_offset
        self.drop_stragglers = drop_stragglers
        self.bank_of_node: dict[int, str] = {}
        self._sent: dict[str, tuple[set[int], str]] = {}
        self._download_bytes: dict[str, int] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> Bank rounds: at least %d successful banks per round, drop stragglers: %s, "
            "rounds numbered from %d", self.min_banks, self.drop_stragglers, self.round_offset + 1)
        super().summary()  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure("train", server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure("evaluate", server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_number = server_round + self.round_offset
        accepted = self._accept("train", round_number, list(replies))
        arrays, metrics = self.combine_train(round_number, accepted)
        if metrics is not None:
            metrics["upload_bytes"] = sum(protocol.payload_bytes(reply.content) for reply in accepted)
            metrics["download_bytes"] = self._download_bytes.pop("train", 0)
        self._record_aggregate("train", round_number, metrics)
        return arrays, metrics

    def combine_train(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global state from the accepted train replies: Flower's own aggregation here."""
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def check_update(self, reply: Message, server_round: int, state_hash: str) -> str:
        """Why an accepted train reply's update must not be aggregated ("" if it may); none here."""
        return ""

    def server_state(self) -> dict[str, np.ndarray]:
        """What the strategy itself must carry across a restart, checkpointed every round; none here."""
        return {}

    def restore_server_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back `server_state()` from the checkpoint a run resumes from; nothing to take here."""

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        round_number = server_round + self.round_offset
        accepted = self._accept("evaluate", round_number, list(replies))
        # Under DP a bank may withhold its validation metrics (dp.report_validation) and reply with its
        # row count alone; Flower averages only replies with the same keys, so those of the others.
        reporting = [reply for reply in accepted if set(_metrics(reply)) - {protocol.NUM_EXAMPLES}]
        metrics = super().aggregate_evaluate(round_number, reporting) if reporting else None  # type: ignore[misc]
        if accepted:
            metrics = metrics if metrics is not None else MetricRecord()
            metrics["download_bytes"] = self._download_bytes.pop("evaluate", 0)
        self._record_aggregate("evaluate", round_number, metrics)
        return metrics

    def _configure(
        self, phase: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        state_hash = protocol.record_hash(arrays)
        config[protocol.STATE_HASH] = state_hash
        parent = super().configure_train if phase == "train" else super().configure_evaluate  # type: ignore[misc]
        messages = list(parent(server_round + self.round_offset, arrays, config, grid))
        self._sent[phase] = ({m.metadata.dst_node_id for m in messages}, state_hash)
        self._download_bytes[phase] = sum(protocol.payload_bytes(m.content) for m in messages)
        return messages

    def _accept(self, phase: str, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies to aggregate; raise FederationRoundError if too few banks succeeded."""
        sent_to, state_hash = self._sent.pop(phase, (set(), ""))
        if not sent_to:
            return replies
        accepted: list[Message] = []
        failures: list[str] = []
        declined = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            problem, receipt = _check(reply, server_round, state_hash)
            if receipt is not None:
                self.bank_of_node[node] = receipt.bank
            bank = self.bank_of_node.get(node, f"node {node}")
            reason = "" if problem else _declined(reply)
            if phase == "train" and not problem and not reason:
                problem = self.check_update(reply, server_round, state_hash)
            metrics = {} if problem else _metrics(reply)
            if problem:
                failures.append(f"{self._who(node)}: {problem}")
                log(WARNING, "round %d %s: %s failed: %s", server_round, phase, self._who(node), problem)
                self.history.add(server_round, phase, bank, status="failed", node_id=node, reason=problem)
            elif reason:
                log(WARNING, "round %d %s: %s declined: %s", server_round, phase, self._who(node), reason)
                self.history.add(server_round, phase, bank, status="declined", node_id=node, reason=reason)
                declined += 1
            elif phase == "train" and self.drop_stragglers and metrics.get("straggler", 0.0) > 0:
                log(INFO, "round %d: dropping straggler %s (%d of %d local steps)", server_round, bank,
                    int(metrics.get("local_steps", 0)), int(metrics.get("planned_steps", 0)))
                self.history.add(server_round, phase, bank, metrics, status="dropped", node_id=node,
                                 reason="straggler (drop_stragglers)")
            else:
                self.history.add(server_round, phase, bank, metrics, node_id=node)
                accepted.append(reply)
        for node in sorted(sent_to - {reply.metadata.src_node_id for reply in replies}):
            failures.append(f"{self._who(node)}: no reply within the round timeout")
            log(WARNING, "round %d %s: %s did not reply in time", server_round, phase, self._who(node))
            self.history.add(server_round, phase, self.bank_of_node.get(node, f"node {node}"), status="failed",
                             node_id=node, reason="no reply within the round timeout")
        required = min(self.min_banks, len(sent_to) - declined)
        if len(accepted) < required:
            detail = "\n  ".join(failures) if failures else "(none failed: the others were dropped as stragglers)"
            raise FederationRoundError(
                f"round {server_round} {phase}: {len(accepted)} of {len(sent_to)} sampled banks succeeded, "
                f"the minimum is {required}. Failures:\n  {detail}"
            )
        return accepted

    def _who(self, node: int) -> str:
        """A bank's name and node id once a reply told us its name, else the node id alone."""
        name = self.bank_of_node.get(node)
        return f"bank {name} (node {node})" if name else f"node {node}"

    def _record_aggregate(self, phase: str, server_round: int, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self.history.add(server_round, phase, FEDERATION, dict(metrics))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TYPED = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.S)


def short_reason(reason: str) -> str:
    """The bank's exception message out of Flower's error reason.

    Flower reports a ClientApp exception as "<class 'T'>:<'message'>"; in a simulation the
    message is Ray's whole remote traceback, ending in "Message: <the exception message>".
    """
    text = _ANSI.sub("", reason).strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1].removesuffix("'>")
    elif match := _TYPED.fullmatch(text):
        text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return " ".join(text.split()) or reason


def _check(reply: Message, server_round: int, state_hash: str) -> tuple[str, Receipt | None]:
    """Why a reply cannot be used ("" if it can), and the bank's receipt when it sent one."""
    if reply.has_error():
        return short_reason(reply.error.reason), None
    content = reply.content
    if protocol.RECEIPT not in content.config_records:
        return "reply without a bank receipt (not the fingpt-federated ClientApp?)", None
    receipt = Receipt.from_config(content.config_records[protocol.RECEIPT])
    if receipt.server_round != server_round or receipt.state_hash != state_hash:
        return (
            f"stale reply: it answers round {receipt.server_round} / state {receipt.state_hash[:12]}, "
            f"expected round {server_round} / state {state_hash[:12]}"
        ), receipt
    return "", receipt


def _declined(reply: Message) -> str:
    """Why the bank declined to train ("" if it did not decline)."""
    records = reply.content.config_records
    if protocol.STATUS not in records or records[protocol.STATUS].get("status") != protocol.DECLINED:
        return ""
    return str(records[protocol.STATUS].get("reason", "no reason given"))


def _metrics(reply: Message) -> Mapping[str, Any]:
    records = reply.content.metric_records
    return dict(records[protocol.METRICS]) if protocol.METRICS in records else {}
