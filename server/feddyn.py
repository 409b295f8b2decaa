"""FedDyn's server side (Acar et al. 2021): the correction h that keeps the average on the banks' common optimum.

`FedDyn` wraps the Flower strategy (FedAvg) as Scaffold does. Each train message's config carries
alpha (`feddyn-alpha`), with which the banks add FedDyn's linear and quadratic terms to their local
objective (client/feddyn.py). After the wrapped strategy has averaged the replies into y (weighted by
the banks' examples, as the state always is here), with x the state sent,

    h <- h - alpha · (|S|/N) · (y - x),        global <- y - h / alpha,

N the banks of the federation and |S| those whose state was averaged: h is the example-weighted mean of
the banks' g_k (each moves by -alpha · (y_k - x)), as in the paper and in Flower's FedDyn baseline
(depthfl's aggregate, which uses the unweighted mean and every bank's count). h starts at zero and is an
attribute of the wrapper, so the round's checkpoint holds it (server/strategy_state.py). Nothing extra
travels upstream. Plaintext only: under HE the server never sees y.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fingpt_federated.federation import protocol
from fingpt_federated.server.strategy_wrapper import StrategyWrapper


class FedDyn(StrategyWrapper):
    """The wrapped strategy plus FedDyn's server correction; see the module docstring."""

    def __init__(self, strategy: Strategy, alpha: float) -> None:
        if alpha <= 0:
            raise ValueError(f"FedDyn's alpha must be > 0, got {alpha}")
        super().__init__(strategy)
        self.alpha = alpha
        self.h: dict[str, np.ndarray] = {}
        self._sent: ArrayRecord | None = None  # an ArrayRecord: the checkpoint holds the state already
        self._banks = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays
        self._banks = len(list(grid.get_node_ids()))
        config[protocol.FEDDYN_ALPHA] = self.alpha
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        averaged = sum(1 for reply in replies if reply.has_content() and protocol.ARRAYS in reply.content.array_records)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or self._sent is None or averaged == 0:
            return arrays, metrics
        mean = {name: array.numpy() for name, array in arrays.items()}
        sent = {name: array.numpy() for name, array in self._sent.items()}
        self.h = moved_h(self.h, mean, sent, self.alpha, averaged / max(self._banks, averaged))
        corrected = {name: (mean[name] - self.h[name] / self.alpha).astype(mean[name].dtype) for name in mean}
        return ArrayRecord({name: Array(value) for name, value in corrected.items()}), metrics


def moved_h(
    h: dict[str, np.ndarray], mean: dict[str, np.ndarray], sent: dict[str, np.ndarray], alpha: float, share: float
) -> dict[str, np.ndarray]:
    """h - alpha · share · (mean - sent), h starting at zero; `share` = |S|/N."""
    return {
        name: (h.get(name, np.zeros_like(value, dtype=np.float32)) - alpha * share * (value - sent[name])).astype(
            np.float32
        )
        for name, value in mean.items()
    }
