"""FedAvgM (Hsu et al. 2019) for the bank federation: Flower's FedAvgM behind `BankRounds`.

The server treats the change of the weighted mean state as a pseudo-gradient and takes an SGD
step with momentum on it: v <- momentum * v + (global - mean), then global <- global - server_lr * v.
Under DP this is post-processing of the banks' noised states (no privacy cost), though momentum
also accumulates their noise: on TFNS at epsilon 8 its accuracy collapsed in some rounds (README,
DP section). The momentum is checkpointed with the global state every round, so a resumed run
goes on with it. It needs the plaintext global state, so it does not combine with HE.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvgM

from fingpt_federated.server.strategy import BankRounds

MOMENTUM = "momentum."


class FedAvgMBanks(BankRounds, FedAvgM):
    """Flower's FedAvgM with loud rounds, per-bank metrics, global round numbers and a momentum
    that survives a restart."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restored: dict[str, np.ndarray] = {}

    def server_state(self) -> dict[str, np.ndarray]:
        if self.momentum_vector is None or self.current_arrays is None:
            return {}
        return {MOMENTUM + name: np.ascontiguousarray(vector)
                for name, vector in zip(self.current_arrays.keys(), self.momentum_vector, strict=True)}

    def restore_server_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._restored = {key.removeprefix(MOMENTUM): value for key, value in state.items() if key.startswith(MOMENTUM)}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.momentum_vector is None and self._restored:
            # Flower keeps the momentum as a list in the order of the state's arrays.
            self.momentum_vector = [self._restored[name] for name in arrays.keys()]
        return super().configure_train(server_round, arrays, config, grid)
