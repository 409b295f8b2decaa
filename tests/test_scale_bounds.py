"""What the operator keeps grows with rounds and banks: each thing that would grow without end has a bound.

docs/scale.md lists what grows with the number of banks and rounds and how each is bounded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fingpt_federated.conf import compose_config
from fingpt_federated.federation import protocol
from fingpt_federated.server.update_checks import UpdateChecks, UpdateGate
from fingpt_federated.simulations import bench_scale

SENT = {"w": np.zeros(3, dtype=np.float32)}


def state(value: float) -> ArrayRecord:
    return ArrayRecord({name: Array(array + np.float32(value)) for name, array in SENT.items()})


def reply(value: float) -> RecordDict:
    metrics = MetricRecord({protocol.NUM_EXAMPLES: 10, "train_loss": 0.5})
    return RecordDict({protocol.ARRAYS: state(value), protocol.METRICS: metrics})


def test_the_replay_check_remembers_the_newest_states_only():
    """Every round adds the global sent and each accepted update: 6 rounds of 2 banks would be 18 states."""
    gate = UpdateGate(UpdateChecks(replay_memory=4))
    for server_round in range(1, 7):
        gate.sent(server_round, state(server_round))
        for bank in (1, 2):
            gate.accepted(reply(server_round + bank / 10), f"bank_{bank}", server_round)
    assert len(gate._seen) == 4
    newest = gate.check(reply(6.2))[0]
    assert newest == "replayed state: it is the update of bank_2 in round 6"
    assert gate.check(reply(5.2))[0] == "replayed state: it is the update of bank_2 in round 5"
    assert gate.check(reply(1.1))[0] == ""  # forgotten: round 1 is 5 rounds and 14 states back


def test_the_default_replay_memory_covers_hundreds_of_rounds_of_20_banks():
    assert UpdateChecks().replay_memory >= 21 * 100
    assert compose_config(["strategy.update_checks.replay_memory=50"]).strategy.update_checks.replay_memory == 50


@pytest.mark.parametrize("bad", [0, -1])
def test_the_replay_memory_must_hold_a_state(bad):
    with pytest.raises(ValueError, match="strategy.update_checks.replay_memory must be at least 1"):
        UpdateChecks(replay_memory=bad)


@pytest.mark.slow
def test_bench_scale_reports_round_times_and_the_operators_memory(tmp_path, capsys):
    """The benchmark behind docs/scale.md's table, at 4 and 8 banks with 2 sampled: the sampler finds the
    operator's process, and the per-bank files grow with the banks while the sampled count stays. One
    ClientApp actor (one Ray CPU), as the suite's other simulations: a second actor pays its imports again."""
    args = ["--banks", "4", "8", "--sampled", "2", "--rounds", "2", "--test-rows", "40", "--out", str(tmp_path)]
    bench_scale.main([*args, "simulation.total_cpus=1"])

    rows = json.loads((tmp_path / "scale.json").read_text())
    assert [r["banks"] for r in rows] == [4, 8]
    for row in rows:
        assert len(row["round_seconds"]) == 2 and all(s > 0 for s in row["round_seconds"])
        assert row["operator_peak_mib"] > 100  # flwr-simulation: torch, Flower, the Ray driver
        assert row["peak_mib_by_process"]["ClientAppActor"] > 100
    assert rows[0]["later_rounds_vs_first"] == 1.0
    assert rows[1]["run_folder_files"] > rows[0]["run_folder_files"]
    history = json.loads((tmp_path / "banks_8" / "metrics.json").read_text())
    trained = {row["bank"] for row in history["rows"] if row["phase"] == "train" and row["round"] == 1}
    assert len(trained - {"federation"}) == 2  # 2 of 8 sampled
    assert "operator MiB" in capsys.readouterr().out
