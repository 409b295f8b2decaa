"""Learning rates that decay across rounds: the cosine, the round's local rate sent to the banks and
used by them, and the server's step set on Flower's strategy before each round."""

from __future__ import annotations

import math

import pytest
from federation_helpers import config
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM

from fingpt_federated.client.worker_task import local_train_config
from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import RoundTask
from fingpt_federated.model.lr_schedule import cosine
from fingpt_federated.server.history import History
from fingpt_federated.server.round_schedule import RoundSchedule
from fingpt_federated.server.strategy_config import build_strategy, check_strategy


def test_the_cosine_starts_at_start_ends_at_final_and_stays_there():
    rates = [cosine(1.0, 0.2, r, 5) for r in range(1, 8)]
    assert rates[0] == 1.0 and rates[4] == pytest.approx(0.2) and rates[5] == rates[6] == rates[4]
    assert rates[2] == pytest.approx(0.6)  # halfway: the mean of the two
    assert rates[1] == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a > b for a, b in zip(rates[:4], rates[1:5], strict=True))
    assert cosine(1.0, 0.2, 3, 1) == 1.0  # a one-round run keeps its start


def test_each_round_sends_its_local_rate_and_sets_the_servers_step():
    strategy = FedAdam(eta=0.1)
    schedule = RoundSchedule(strategy, planned_rounds=3, local_lr=0.004, local_lr_final=0.001, server_lr_final=0.02)
    sent, etas = [], []
    for server_round in (1, 2, 3):
        round_config = ConfigRecord({protocol.SERVER_ROUND: server_round})
        schedule.apply(server_round, round_config)
        sent.append(round_config[protocol.LOCAL_LR])
        etas.append(strategy.eta)
    assert sent == pytest.approx([0.004, 0.0025, 0.001])
    assert etas == pytest.approx([0.1, 0.06, 0.02])
    momentum = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    RoundSchedule(momentum, planned_rounds=2, local_lr=0.1, server_lr_final=0.1).apply(2, ConfigRecord())
    assert momentum.server_learning_rate == pytest.approx(0.1)


def test_a_bank_trains_with_the_rounds_local_rate_and_without_one_with_its_own():
    cfg = config()
    base = {
        protocol.SERVER_ROUND: 2,
        protocol.MODEL_CONFIG: '{"train": {"lr": 0.003}}',
        protocol.CLASS_NAMES: ["a", "b"],
        protocol.NUM_FEATURES: 0,
        protocol.STATE_HASH: "x",
    }
    assert local_train_config(RoundTask.from_config(ConfigRecord(base))).lr == 0.003
    scheduled = RoundTask.from_config(ConfigRecord({**base, protocol.LOCAL_LR: 0.0005}))
    assert local_train_config(scheduled).lr == 0.0005
    built = build_strategy(
        config("strategy=fedadam", "strategy.local_lr_final=0.0001", "federation.rounds=4"), History()
    )
    assert built.schedule is not None and built.schedule.local_lr == float(cfg.model.train.lr)
    assert built.schedule.local_lr_in(4) == pytest.approx(0.0001)


def test_a_server_rate_schedule_on_a_strategy_without_a_server_step_is_refused():
    with pytest.raises(ValueError, match="strategy.server_lr_final: Flower's FedAvg takes no server step"):
        check_strategy(config("strategy=fedavg", "strategy.server_lr_final=0.01"), encrypted=False)
    assert build_strategy(config("strategy=fedavg"), History()).schedule is None
