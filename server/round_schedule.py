"""Learning rates that decay across rounds (`strategy.local_lr_final`, `strategy.server_lr_final`).

- The banks' local rate: round r's `local-lr` goes into that round's train config, on a cosine
  from `model.train.lr` to `strategy.local_lr_final` over `federation.rounds` (model/lr_schedule.py);
  the bank trains with it instead of `model.train.lr` (under DP, `dp.lr` still wins when set).
- The server's step: the Flower strategy's own rate, FedOpt's `eta` (FedAdam, FedYogi, FedAdagrad)
  or FedAvgM's `server_learning_rate`, set before each round on a cosine from its configured value
  to `strategy.server_lr_final`. Other strategies adopt the mean and have no such step: refused.

Both are functions of the global round number, so a resumed run takes the rates of its rounds.
"""

from __future__ import annotations

import inspect

from flwr.app import ConfigRecord
from flwr.serverapp.strategy import Strategy

from fingpt_federated.federation import protocol
from fingpt_federated.model.lr_schedule import cosine

SERVER_RATES = ("eta", "server_learning_rate")
"""The arguments (and attributes) of Flower's strategies that hold the server's step size."""


def server_rate_attribute(flower: type[Strategy]) -> str | None:
    """The argument of `flower` that holds its server step size (FedOpt, FedAvgM); None when it has none."""
    parameters = inspect.signature(flower).parameters
    return next((name for name in SERVER_RATES if name in parameters), None)


class RoundSchedule:
    """Sets each round's local rate in the train config and the server's rate on `strategy`.

    A None final rate keeps that rate constant; `strategy` is the Flower strategy itself (not a wrapper).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        planned_rounds: int,
        local_lr: float,
        local_lr_final: float | None = None,
        server_lr_final: float | None = None,
    ) -> None:
        self.strategy = strategy
        self.planned_rounds = planned_rounds
        self.local_lr = local_lr
        self.local_lr_final = local_lr_final
        self.server_lr_final = server_lr_final
        self.attribute = server_rate_attribute(type(strategy))
        if server_lr_final is not None and self.attribute is None:
            raise ValueError(
                f"strategy.server_lr_final: Flower's {type(strategy).__name__} takes no server step "
                f"(it has none of {', '.join(SERVER_RATES)}): use FedAdam, FedYogi, FedAdagrad or FedAvgM"
            )
        self.server_lr = float(getattr(strategy, self.attribute)) if self.attribute else None

    def local_lr_in(self, server_round: int) -> float | None:
        """The banks' rate in `server_round` (None: no schedule, they keep `model.train.lr`)."""
        if self.local_lr_final is None:
            return None
        return cosine(self.local_lr, self.local_lr_final, server_round, self.planned_rounds)

    def server_lr_in(self, server_round: int) -> float | None:
        """The server's rate in `server_round` (None: no schedule)."""
        if self.server_lr_final is None or self.server_lr is None:
            return None
        return cosine(self.server_lr, self.server_lr_final, server_round, self.planned_rounds)

    def apply(self, server_round: int, config: ConfigRecord) -> None:
        """Before `server_round`'s train messages: its local rate into `config`, its server rate onto the strategy."""
        local = self.local_lr_in(server_round)
        if local is not None:
            config[protocol.LOCAL_LR] = local
        server = self.server_lr_in(server_round)
        if server is not None and self.attribute is not None:
            setattr(self.strategy, self.attribute, server)
