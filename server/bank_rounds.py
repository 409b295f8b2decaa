"""What this federation adds to any Flower strategy: loud rounds, per-bank metrics, resume.

Flower's strategies aggregate whatever replies arrive and log failures at INFO; a round where
every bank crashed still "completes". `BankRounds` wraps a strategy object, as Flower's own DP
wrappers do (flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping), and leaves
sampling, message construction and aggregation to it:

- configure_*: stamps the hash of the global state being sent into the round config (and the
  FedProx `proximal-mu` the banks apply, whatever the strategy, and the round's learning rates of
  a `RoundSchedule`: server/round_schedule.py), numbers rounds globally (a
  resumed run continues at round k+1, not at 1; the wrapped strategy sees global numbers too);
  under DP every train message also carries the bank's recorded privacy spend (server/privacy_record.py);
- aggregate_*: checks every reply (error, stale receipt, a bank name another node answered with or a
  node answering under a new name; in a deployment, a node answering under any name but the one the
  operator registered its key as, or a node not in the registry; straggler to drop), logs each failed
  bank with its reason at WARNING, raises `FederationRoundError` listing all reasons when fewer
  banks than the minimum succeeded, records every bank's metrics in the run's History, and only
  then hands the accepted replies to the wrapped strategy. `check_update` is an optional per-update
  gate (the encrypted aggregation's, server/encrypted_aggregation.py), run before any aggregation
  and counted as a failure of that bank; `update_gate` checks plaintext updates the same way
  (names, shapes, dtypes, finite, not replayed, norm bounded: server/update_checks.py), then the
  round's replies against each other (norm against the median). An aggregate holding a non-finite
  value stops the run (`FederationRoundError`) instead of becoming the global state. A bank that
  declined to train (its privacy budget is spent) is logged and recorded as "declined", not as a
  failure: the minimum counts the banks that could train, and a round where none could leaves the
  global state as is. Evaluation averages the
  replies that carry metrics: under DP a bank may answer with its row count alone
  (dp.report_validation).
- the new global state keeps the dtypes of the state sent: FedOpt's step (FedAdam...) computes in
  float64, which would double the state on the wire and in checkpoints for no precision the banks use;
- server_state / restore_server_state: what the wrapped strategy learns across rounds (FedAvgM's
  momentum, FedAdam's moments...), checkpointed every round (server/strategy_state.py).

Each round's aggregated metrics also count model-state bytes on the wire, for the report:
`upload_bytes` (accepted train replies, counted before the wrapped strategy may consume them) and
`download_bytes` (the train, resp. evaluate, messages sent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fingpt_federated.federation import protocol
from fingpt_federated.server import privacy_record, strategy_state
from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.server.replies import (
    check_reply,
    declined_reason,
    reply_metrics,
    reported_examples,
    unusable_metrics,
)
from fingpt_federated.server.round_schedule import RoundSchedule
from fingpt_federated.server.update_checks import Bound, UpdateGate, non_finite

UpdateCheck = Callable[[Message, int, str], str]
"""(train reply, global round, hash of the state sent) -> why its update must not be aggregated, "" if it may."""


class FederationRoundError(RuntimeError):
    """Fewer banks than the configured minimum completed a round: the run must stop."""


@dataclass(frozen=True)
class _Candidate:
    """A reply that passed its own checks, before the round's replies are compared."""

    reply: Message
    node: int
    norm: float
    bounded: dict[str, float] = field(default_factory=dict)  # what the round's bounds changed, for the History
    control_norm: float = math.nan  # SCAFFOLD: the norm of the bank's control variate change


class BankRounds(Strategy):
    """Wraps any Flower strategy with the bank-round behaviour; see the module docstring."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        min_banks: int,
        history: History,
        round_offset: int = 0,
        drop_stragglers: bool = False,
        mu: float = 0.0,
        check_update: UpdateCheck | None = None,
        update_gate: UpdateGate | None = None,
        schedule: RoundSchedule | None = None,
        registry: Callable[[], Mapping[int, str]] | None = None,
    ) -> None:
        if min_banks < 1:
            raise ValueError(f"min_banks must be at least 1, got {min_banks}")
        if mu < 0:
            raise ValueError(f"the proximal term mu must be >= 0, got {mu}")
        self.strategy = strategy
        self.min_banks = min_banks
        self.history = history
        self.round_offset = round_offset
        self.drop_stragglers = drop_stragglers
        self.mu = mu
        self.check_update = check_update
        self.update_gate = update_gate
        self.schedule = schedule
        # a deployment's authenticated node ids and the names the operator registered them under (read again when
        # a node it does not hold answers: a bank accepted during the run); a node answers for that bank only.
        # Without a registry (a simulation) a node keeps the first name it answers with.
        self.registry = registry
        self.registered_nodes: dict[int, str] = dict(registry()) if registry is not None else {}
        self.bank_of_node: dict[int, str] = dict(self.registered_nodes)
        self._sent: dict[str, tuple[set[int], str]] = {}
        self._download_bytes: dict[str, int] = {}
        self._sent_dtypes: dict[str, str] = {}

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Bank rounds: at least %d successful banks per round, drop stragglers: %s, "
            "proximal mu: %s, rounds numbered from %d",
            self.min_banks,
            self.drop_stragglers,
            self.mu,
            self.round_offset + 1,
        )
        log(INFO, "\t├──> Wrapping %s:", type(self.strategy).__name__)
        self.strategy.summary()

    def server_state(self) -> dict[str, np.ndarray]:
        """What the wrapped strategy must carry across a restart, checkpointed every round."""
        return strategy_state.capture(self.strategy)

    def restore_server_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back `server_state()` from the checkpoint a run resumes from."""
        strategy_state.restore(self.strategy, state)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[protocol.PROXIMAL_MU] = self.mu
        if self.schedule is not None:
            self.schedule.apply(server_round + self.round_offset, config)
        self._sent_dtypes = {name: array.dtype for name, array in arrays.items()}
        if self.update_gate is not None:
            self.update_gate.sent(server_round + self.round_offset, arrays)
        messages = self._configure("train", server_round, arrays, config, grid)
        return privacy_record.stamp(messages, self.history, self.bank_of_node)  # under DP: each bank's spend

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._configure("evaluate", server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_number = server_round + self.round_offset
        accepted = self._accept("train", round_number, list(replies))
        # Before aggregating: some strategies (FedTrimmedAvg) pop the arrays out of the replies.
        upload_bytes = sum(protocol.payload_bytes(reply.content) for reply in accepted)
        arrays, metrics = self.strategy.aggregate_train(round_number, accepted)
        arrays = None if arrays is None else _in_dtypes(arrays, self._sent_dtypes)
        if arrays is not None and (bad := non_finite(arrays)):
            raise FederationRoundError(
                f"round {round_number} train: the aggregate of {len(accepted)} accepted updates holds non-finite "
                f"values in {len(bad)} tensors ({', '.join(bad[:3])}...): not adopted, the run stops"
            )
        if metrics is not None:
            metrics["upload_bytes"] = upload_bytes
            metrics["download_bytes"] = self._download_bytes.pop("train", 0)
        self._record_aggregate("train", round_number, metrics)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        round_number = server_round + self.round_offset
        accepted = self._accept("evaluate", round_number, list(replies))
        # Under DP a bank may withhold its validation metrics (dp.report_validation) and reply with its
        # row count alone; Flower averages only replies with the same keys, so those of the others.
        reporting = [reply for reply in accepted if set(reply_metrics(reply)) - {protocol.NUM_EXAMPLES}]
        metrics = self.strategy.aggregate_evaluate(round_number, reporting) if reporting else None
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
        inner = self.strategy.configure_train if phase == "train" else self.strategy.configure_evaluate
        messages = list(inner(server_round + self.round_offset, arrays, config, grid))
        self._sent[phase] = ({m.metadata.dst_node_id for m in messages}, state_hash)
        self._download_bytes[phase] = sum(protocol.payload_bytes(m.content) for m in messages)
        return messages

    def _accept(self, phase: str, server_round: int, replies: list[Message]) -> list[Message]:
        """The replies to aggregate; raise FederationRoundError if too few banks succeeded."""
        sent_to, state_hash = self._sent.pop(phase, (set(), ""))
        if not sent_to:
            return replies
        failures: list[str] = []
        candidates: list[_Candidate] = []
        declined = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            problem, reason, norm = self._screen(phase, server_round, reply, state_hash)
            if problem:
                failures.append(self._failed(phase, server_round, node, problem))
            elif reason:
                log(WARNING, "round %d %s: %s declined: %s", server_round, phase, self._who(node), reason)
                self.history.add(server_round, phase, self._bank(node), status="declined", node_id=node, reason=reason)
                declined += 1
            else:
                candidates.append(_Candidate(reply, node, norm))
        candidates = self._compared(phase, server_round, candidates, failures)
        # in bank order, not arrival order: the aggregate's float sums, and so the run, are reproducible
        candidates.sort(key=lambda c: (self._bank(c.node), c.node))
        accepted = [c.reply for c in candidates if self._record(phase, server_round, c)]
        failures += self._missing(phase, server_round, sent_to, replies)
        required = min(self.min_banks, len(sent_to) - declined)
        if len(accepted) < required:
            detail = "\n  ".join(failures) if failures else "(none failed: the others were dropped as stragglers)"
            raise FederationRoundError(
                f"round {server_round} {phase}: {len(accepted)} of {len(sent_to)} sampled banks succeeded, "
                f"the minimum is {required}. Failures:\n  {detail}"
            )
        return accepted

    def _screen(self, phase: str, server_round: int, reply: Message, state_hash: str) -> tuple[str, str, float]:
        """One reply on its own: why it fails ("" if it does not), why the bank declined ("" if it did not),
        and its update's norm (NaN if unknown)."""
        node = reply.metadata.src_node_id
        problem, receipt = check_reply(reply, server_round, state_hash)
        if receipt is not None:
            problem = problem or self._impersonation(node, receipt.bank)
            self.bank_of_node.setdefault(node, receipt.bank)
            problem = problem or (self.update_gate.unregistered(receipt.bank) if self.update_gate else "")
        reason = "" if problem else declined_reason(reply)
        norm = math.nan
        if phase == "train" and not problem and not reason:
            problem, norm = self._check_update(reply, server_round, state_hash)
        if phase == "evaluate" and not problem:
            problem = unusable_metrics(reply_metrics(reply))
        return problem, reason, norm

    def _compared(
        self, phase: str, server_round: int, candidates: list[_Candidate], failures: list[str]
    ) -> list[_Candidate]:
        """The round's replies against each other (the update gate's outliers refused, into `failures`; its
        bounds applied); evaluate counts capped as train counts are, as they weigh the validation metrics."""
        if self.update_gate is None:
            return candidates
        if phase == "evaluate":
            return self._capped_counts(server_round, candidates)
        candidates = [replace(c, control_norm=self.update_gate.control_norm(c.reply.content)) for c in candidates]
        controls = {c.node: c.control_norm for c in candidates}
        refused = self.update_gate.outliers(
            {c.node: c.norm for c in candidates},
            {c.node: frozenset(reply_metrics(c.reply)) for c in candidates},
            controls,
        )
        failures += [self._failed(phase, server_round, node, reason) for node, reason in refused.items()]
        return self._bounded(server_round, [c for c in candidates if c.node not in refused])

    def _impersonation(self, node: int, bank: str) -> str:
        """Why a reply naming `bank` from `node` is refused: a node answers for the bank it is registered as
        (a deployment) or else keeps the name it first answered with, and two nodes never share one (the
        name picks the bank's registered count, its DP ledger and its record)."""
        if self.registry is not None and node not in self.registered_nodes:
            problem = self._read_registry()
            if node not in self.registered_nodes:
                return problem or f"node {node} is not in the operator's bank registry"
        known = self.bank_of_node.get(node)
        if known is not None and known != bank:
            if node in self.registered_nodes:
                return (
                    f"node {node} is registered as bank {known}, its reply names {bank} (a bank answers under the "
                    f"name its key was registered as; if {bank} is that bank's own name: fingpt-server rename-bank "
                    f"{known} {bank})"
                )
            return f"node {node} answered as bank {known} before, now as {bank}"
        other = next((n for n, name in self.bank_of_node.items() if name == bank and n != node), None)
        return "" if other is None else f"bank name {bank} already answered from node {other}"

    def _read_registry(self) -> str:
        """Take the registry as it is now (banks accepted or renamed during the run); why it could not be read."""
        assert self.registry is not None
        try:
            self.registered_nodes = dict(self.registry())
        except (OSError, ValueError) as error:  # RegistryError is a ValueError
            return f"the operator's bank registry could not be read again: {error}"
        self.bank_of_node.update(self.registered_nodes)
        return ""

    def _check_update(self, reply: Message, server_round: int, state_hash: str) -> tuple[str, float]:
        """Why a train reply's update must not be aggregated ("" if it may), and its norm (NaN if unknown)."""
        problem = self.check_update(reply, server_round, state_hash) if self.check_update is not None else ""
        if not problem and self.update_gate is not None:
            return self.update_gate.check(reply.content)
        return problem, math.nan

    def _bounded(self, server_round: int, candidates: list[_Candidate]) -> list[_Candidate]:
        """The candidates with the update gate's bounds (clipped norms, capped count) applied and noted."""
        assert self.update_gate is not None
        examples = {c.node: reported_examples(c.reply) for c in candidates}
        bounds = self.update_gate.bounds(
            {c.node: c.norm for c in candidates},
            examples,
            self._banks(candidates),
            {c.node: c.control_norm for c in candidates},
        )
        out = []
        for candidate in candidates:
            bound = bounds.get(candidate.node)
            if bound is None:
                out.append(candidate)
                continue
            reported = examples[candidate.node]
            self.update_gate.bound(candidate.reply.content, bound, self._bank(candidate.node), server_round)
            noted = {"clip_scale": bound.scale} | ({"reported_examples": reported} if bound.examples else {})
            control = ""
            if bound.control_scale < 1.0:
                noted["control_clip_scale"] = bound.control_scale
                control = f" (its control variate change by {bound.control_scale:.3g})"
            log(
                WARNING,
                "round %d train: %s bounded: update scaled by %.3g%s, weighed as %g examples (reported %g)",
                server_round,
                self._who(candidate.node),
                bound.scale,
                control,
                bound.examples or reported,
                reported,
            )
            out.append(replace(candidate, bounded=noted))
        return out

    def _capped_counts(self, server_round: int, candidates: list[_Candidate]) -> list[_Candidate]:
        """Evaluate replies weighed as the update gate's count caps allow, noted as a train reply's bound is."""
        assert self.update_gate is not None
        examples = {c.node: reported_examples(c.reply) for c in candidates}
        caps = self.update_gate.count_caps(examples, self._banks(candidates))
        for node, cap in caps.items():
            reply = next(c.reply for c in candidates if c.node == node)
            Bound(examples=cap).apply(reply.content, {})
            message = "round %d evaluate: %s weighed as %g examples (reported %g)"
            log(WARNING, message, server_round, self._who(node), cap, examples[node])
        noted = {node: {"reported_examples": examples[node]} for node in caps}
        return [replace(c, bounded=noted[c.node]) if c.node in noted else c for c in candidates]

    def _banks(self, candidates: list[_Candidate]) -> dict[int, str]:
        return {c.node: self._bank(c.node) for c in candidates}

    def _failed(self, phase: str, server_round: int, node: int, problem: str) -> str:
        """Log and record a bank's failure of the round; its failure line."""
        log(WARNING, "round %d %s: %s failed: %s", server_round, phase, self._who(node), problem)
        self.history.add(server_round, phase, self._bank(node), status="failed", node_id=node, reason=problem)
        return f"{self._who(node)}: {problem}"

    def _record(self, phase: str, server_round: int, candidate: _Candidate) -> bool:
        """Record a reply that passed every check; whether it is aggregated (a straggler may be dropped)."""
        node, bank = candidate.node, self._bank(candidate.node)
        metrics = dict(reply_metrics(candidate.reply))
        if math.isfinite(candidate.norm):
            metrics["update_norm"] = candidate.norm  # measured here, for setting strategy.update_checks
        if math.isfinite(candidate.control_norm):
            metrics["control_norm"] = candidate.control_norm
        metrics.update(candidate.bounded)
        if phase == "train" and self.drop_stragglers and metrics.get("straggler", 0.0) > 0:
            log(
                INFO,
                "round %d: dropping straggler %s (%d of %d local steps)",
                server_round,
                bank,
                int(metrics.get("local_steps", 0)),
                int(metrics.get("planned_steps", 0)),
            )
            self.history.add(
                server_round, phase, bank, metrics, status="dropped", node_id=node, reason="straggler (drop_stragglers)"
            )
            return False
        self.history.add(server_round, phase, bank, metrics, node_id=node)
        if phase == "train" and self.update_gate is not None and not candidate.bounded:
            self.update_gate.accepted(candidate.reply.content, bank, server_round)  # a bounded one already was
        return True

    def _missing(self, phase: str, server_round: int, sent_to: set[int], replies: list[Message]) -> list[str]:
        """Record every sampled bank that did not reply as failed; their failure lines."""
        failures = []
        for node in sorted(sent_to - {reply.metadata.src_node_id for reply in replies}):
            failures.append(f"{self._who(node)}: no reply within the round timeout")
            log(WARNING, "round %d %s: %s did not reply in time", server_round, phase, self._who(node))
            self.history.add(
                server_round,
                phase,
                self.bank_of_node.get(node, f"node {node}"),
                status="failed",
                node_id=node,
                reason="no reply within the round timeout",
            )
        return failures

    def _bank(self, node: int) -> str:
        return self.bank_of_node.get(node, f"node {node}")

    def _who(self, node: int) -> str:
        """A bank's name and node id once a reply told us its name, else the node id alone."""
        name = self.bank_of_node.get(node)
        return f"bank {name} (node {node})" if name else f"node {node}"

    def _record_aggregate(self, phase: str, server_round: int, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self.history.add(server_round, phase, FEDERATION, dict(metrics))


def _in_dtypes(arrays: ArrayRecord, dtypes: Mapping[str, str]) -> ArrayRecord:
    """`arrays`, each in the dtype its array had in the state sent (those not sent as they are)."""
    changed = {name for name, array in arrays.items() if name in dtypes and array.dtype != dtypes[name]}
    if not changed:
        return arrays
    return ArrayRecord(
        {
            name: Array(array.numpy().astype(dtypes[name])) if name in changed else array
            for name, array in arrays.items()
        }
    )
