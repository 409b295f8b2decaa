"""SCAFFOLD's server side (Karimireddy et al. 2020): the federation's control variate c.

`Scaffold` wraps the Flower strategy (FedAvg, or any other) as LoRAProductMean does. Every train
message gets c as a second ArrayRecord (`scaffold-control`) beside the global state; every reply
brings the bank's change of its own variate, c_i+ - c_i (`scaffold-update`, client/scaffold.py),
which is taken out of the reply before the wrapped strategy aggregates the states (Flower's
strategies expect one ArrayRecord). Then

    c <- c + (|S|/N) · sum over the replying banks S of w_i (c_i+ - c_i),   w_i = n_i / sum_S n_j,

N the number of banks in the federation and n_i a bank's example count: with every bank taking part,
c stays the example-weighted mean of the banks' variates, as the global state is the weighted mean of
their states. (With the paper's unweighted mean, a bank of a dozen rows, whose single AdamW step a
round makes its c_i about 1 in every coordinate, set c for all, and quick_parity's test loss rose to
2.1 by round 8: docs/results.md.) c starts at zero; it is an attribute of the wrapper, so the
round's checkpoint holds it (server/strategy_state.py) and a resumed run goes on with it. Each bank
keeps its own c_i in its state folder, per run (`scaffold-run`).

The update checks (server/update_checks.py) accept the extra record only with the names, shapes
and dtypes of the state sent, finite, and with a norm within `max_norm_ratio` times the round's
median change norm (clipped to `clip_norm_ratio` times it when that bound is on): c corrects every
bank's steps, so one bank's huge change would steer them all. A bank that fails a round sends no change, and c moves by
the others'. Plaintext only: c is the banks' update directions in the clear, which HE is there to hide.
The message carries twice the state downstream, and each reply twice upstream (the report's bytes).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fingpt_federated.federation import protocol
from fingpt_federated.server.replies import reported_examples
from fingpt_federated.server.strategy_wrapper import StrategyWrapper


class Scaffold(StrategyWrapper):
    """The wrapped strategy plus SCAFFOLD's server control variate; see the module docstring."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__(strategy)
        self.control: dict[str, np.ndarray] = {}
        self._banks = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.control:
            self.control = {name: np.zeros_like(array.numpy(), dtype=np.float32) for name, array in arrays.items()}
        self._banks = len(list(grid.get_node_ids()))
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        record = ArrayRecord({name: Array(value) for name, value in self.control.items()})
        for message in messages:
            message.content[protocol.CONTROL] = record
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        changes = [
            (change, reported_examples(reply)) for reply in replies if (change := _pop_change(reply)) is not None
        ]
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and changes:  # c moves with the state it belongs to
            self.control = moved_control(self.control, changes, max(self._banks, len(changes)))
        return arrays, metrics


def moved_control(
    control: dict[str, np.ndarray], changes: list[tuple[dict[str, np.ndarray], float]], banks: int
) -> dict[str, np.ndarray]:
    """c + (|S|/N) · sum of w_i (c_i+ - c_i) over the (change, example count) of the banks S that replied."""
    total = sum(examples for _, examples in changes)
    if total <= 0:
        return control
    share = len(changes) / banks
    return {
        name: (value + share * sum(change[name] * (examples / total) for change, examples in changes)).astype(
            np.float32
        )
        for name, value in control.items()
    }


def _pop_change(reply: Message) -> dict[str, np.ndarray] | None:
    """The bank's c_i+ - c_i, taken out of the reply (None when it sent none)."""
    if protocol.CONTROL_UPDATE not in reply.content.array_records:
        return None
    record = reply.content.array_records[protocol.CONTROL_UPDATE]
    del reply.content[protocol.CONTROL_UPDATE]
    return {name: array.numpy() for name, array in record.items()}
