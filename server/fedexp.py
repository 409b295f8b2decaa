"""FedExP's server step (Jhunjhunwala, Wang, Joshi, ICLR 2023): extrapolate past the banks' average.

Plain FedAvg adopts y, the example-weighted mean of the banks' states: a step of size 1 along the mean
update. When the banks' updates disagree (label-skewed banks, each pulled to its own optimum), the mean
update is much shorter than the banks' own, and the federation crawls. FedExP takes a longer step,
sized each round from the updates themselves (a POCS extrapolation, no learning rate to tune):

    eta = max(1, sum_i w_i ||d_i||^2 / (2 (||d||^2 + epsilon))),   global <- x + eta · d,

x the state sent, d_i = y_i - x each bank's update, w_i its example weight and d = sum_i w_i d_i = y - x.
eta is 1 when the banks agree (d_i all equal: FedAvg) and grows with their disagreement. It is capped
at `max_eta` (5 by default): the paper trusts its clients, but a hostile bank that sends nearly the
negative of the others' mean makes ||d|| small and eta unbounded (eta · ||d|| peaks at
sum_i w_i ||d_i||^2 / (4 sqrt(epsilon)), 8 times that sum with epsilon 1e-3), so without a cap it would
stretch what is left of the mean into a step far longer than any bank's. `FedExP`
wraps the Flower strategy (FedAvg; FedProx's proximal term lives in the banks) as FedDyn does; it reads
the replies' states before the wrapped strategy averages them, so it is plaintext only (under HE the
server never sees a bank's state). The round's eta goes into the round's metrics (`fedexp-eta`).
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

ETA_METRIC = "fedexp-eta"


class FedExP(StrategyWrapper):
    """The wrapped strategy's mean, extrapolated by FedExP's eta; see the module docstring."""

    def __init__(self, strategy: Strategy, epsilon: float, max_eta: float) -> None:
        if not epsilon > 0:
            raise ValueError(f"FedExP's epsilon must be > 0, got {epsilon}")
        if not max_eta >= 1:
            raise ValueError(f"FedExP's max_eta must be >= 1 (1: FedAvg), got {max_eta}")
        super().__init__(strategy)
        self.epsilon = epsilon
        self.max_eta = max_eta
        self._sent: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = {name: array.numpy() for name, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        spread = weighted_update_norm(replies, self._sent)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or spread is None:
            return arrays, metrics
        mean = {name: array.numpy() for name, array in arrays.items()}
        eta = min(self.max_eta, extrapolation(spread, squared_norm(mean, self._sent), self.epsilon))
        moved = {
            name: (self._sent[name] + eta * (value - self._sent[name])).astype(value.dtype)
            for name, value in mean.items()
        }
        metrics = metrics if metrics is not None else MetricRecord()
        metrics[ETA_METRIC] = eta
        return ArrayRecord({name: Array(value) for name, value in moved.items()}), metrics


def extrapolation(weighted_norms: float, mean_norm: float, epsilon: float) -> float:
    """FedExP's eta: max(1, sum_i w_i ||d_i||^2 / (2 (||d||^2 + epsilon)))."""
    return max(1.0, weighted_norms / (2.0 * (mean_norm + epsilon)))


def squared_norm(state: dict[str, np.ndarray], sent: dict[str, np.ndarray]) -> float:
    return float(sum(np.sum((value.astype(np.float64) - sent[name]) ** 2) for name, value in state.items()))


def weighted_update_norm(replies: list[Message], sent: dict[str, np.ndarray]) -> float | None:
    """sum_i w_i ||y_i - x||^2 over the replies that carry a state (w_i: example weights); None for none."""
    norms, weights = [], []
    for reply in replies:
        if not reply.has_content() or protocol.ARRAYS not in reply.content.array_records:
            continue
        state = {name: array.numpy() for name, array in reply.content.array_records[protocol.ARRAYS].items()}
        norms.append(squared_norm(state, sent))
        weights.append(reported_examples(reply))
    if not norms:
        return None
    return float(np.dot(np.asarray(weights) / sum(weights), norms))
