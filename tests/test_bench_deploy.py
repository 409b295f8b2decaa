"""bench_deploy's arithmetic on a run's metrics.json: overhead is the round's wall time minus its
slowest bank's compute, steady state excludes round 1, and backbone loads are summed per bank."""

from __future__ import annotations

import json

import pytest

from fingpt_federated.simulations.bench_deploy import summarise


def row(number, phase, bank, status="ok", **metrics):
    return {"round": number, "phase": phase, "bank": bank, "status": status, "metrics": metrics}


def test_overhead_floor_and_backbone_loads_from_the_run_metrics(tmp_path):
    rows = [
        row(1, "central", "central", round_seconds=20.0, accuracy=0.4),
        row(2, "central", "central", round_seconds=8.0),
        row(3, "central", "central", round_seconds=6.0),
        row(1, "train", "federation", seconds=9.0),
        row(1, "train", "bank0", seconds=2.0, backbone_loads=1),
        row(1, "train", "bank1", seconds=3.0, backbone_loads=1),
        row(2, "train", "bank0", seconds=1.0, backbone_loads=0),
        row(2, "train", "bank1", seconds=2.5, backbone_loads=0),
        row(3, "train", "bank0", seconds=1.5, backbone_loads=0),
        row(3, "train", "bank1", "failed", seconds=50.0, backbone_loads=1),
    ]
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"rows": rows}))
    summary = summarise(metrics, [7.0, 5.0, 4.0])
    assert [r["overhead_s"] for r in summary["rounds"]] == [17.0, 5.5, 4.5]
    assert summary["mean_round_s"] == 7.0 and summary["mean_overhead_s"] == pytest.approx(5.0)
    assert summary["floor_mean_s"] == 4.5
    assert summary["backbone_loads_per_bank"] == {"bank0": 1, "bank1": 1}  # a failed reply is not counted
    assert summary["targets"] == {"overhead_within_floor_plus_1s": True, "one_backbone_load_per_bank": True}
    assert not summarise(metrics, [3.0, 3.0])["targets"]["overhead_within_floor_plus_1s"]
