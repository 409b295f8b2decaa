"""bench_deploy's round breakdown from the ServerApp's timings.json and the workers' timing lines:
the critical path is the bank whose reply was pulled last, its steps add up to the round's wall
time, and a run without worker lines (per-message ClientApps) keeps the server's side only."""

from __future__ import annotations

import json

import pytest

from fingpt_federated.client.worker import TIMING_PREFIX
from fingpt_federated.simulations.bench_deploy_breakdown import STEPS, breakdown, floor_breakdown


def send(group, pushed, replies, ended):
    return dict(group=group, kind="train", started=pushed - 0.2, pushed=pushed, replies=replies, ended=ended, pulls=4)


def timing_line(node, group, process, sent):
    steps = dict(handler=0.6, received=0.7, decoded=0.75, handled=1.5, encoded=1.55)
    line = dict(kind="train", node=node, status="ok", round=group, process=process, sent=sent)
    return TIMING_PREFIX + json.dumps({**line, **{step: process + after for step, after in steps.items()}})


@pytest.fixture
def run(tmp_path):
    rounds = []
    for number, start in ((1, 100.0), (2, 120.0)):
        rounds.append(
            {
                "round": number,
                "started": start,
                "sends": [
                    {
                        **send(str(number), start + 0.5, {"11": start + 5.0, "12": start + 6.0}, start + 6.1),
                        "pull_started": {"11": start + 4.9, "12": start + 4.8},
                    },
                    {**send(str(number), start + 6.2, {}, start + 6.3), "kind": "evaluate"},
                ],
                "ended": start + 6.5,
                "evaluated": start + 7.0,
                "saved": start + 7.5,
            }
        )
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"rounds": rounds}))
    logs = []
    for node, offset in ((11, 1.0), (12, 2.0)):
        log = tmp_path / f"bank{node}.log"
        lines = ["INFO : something else"]
        for start in (100.0, 120.0):  # matched to rounds by time: Flower's strategies leave the group id empty
            lines.append(timing_line(node, "", start + offset, start + offset + 1.7))
        log.write_text("\n".join([*lines, TIMING_PREFIX + "{torn"]) + "\n")
        logs.append(log)
    return timings, logs


def test_the_steps_of_the_slowest_bank_add_up_to_the_round(run):
    timings, logs = run
    result = breakdown(timings, [*logs, logs[0].parent / "missing.log"])
    first, second = result["rounds"]
    assert first["bank_node"] == 12  # its reply was pulled last
    assert first["to_clientapp"] == pytest.approx(1.5) and first["clientapp"] == pytest.approx(0.6)
    assert first["worker_handle"] == pytest.approx(0.75) and first["to_server"] == pytest.approx(6.0 - 3.7)
    assert sum(first[step] for step in STEPS) == pytest.approx(6.5)  # the round's ended - started
    assert first["round_end"] == pytest.approx(1.0) and first["reply_pulls"] == 4
    assert first["reply_pull"] == pytest.approx(1.2)  # of to_server: the pull that brought the reply
    assert result["mean_steady"]["after"] == pytest.approx(second["after"])  # rounds 2.. only


def test_without_worker_lines_only_the_servers_side(run, tmp_path):
    timings, _ = run
    (row, _) = breakdown(timings, [])["rounds"]
    assert row["bank_side"] == pytest.approx(5.5) and "worker" not in row
    assert breakdown(tmp_path / "absent.json", []) == {}


def test_the_floor_rounds_from_its_sends():
    first = {**send("1", 10.0, {"1": 12.0, "2": 13.0}, 13.1), "pull_started": {"1": 11.9, "2": 11.5}}
    result = floor_breakdown({"sends": [first, send("2", 20.0, {"1": 21.0}, 21.1)]})
    assert result["rounds"][0]["reply_pull"] == pytest.approx(1.5) and "reply_pull" not in result["rounds"][1]
    assert [row["bank_side"] for row in result["rounds"]] == [pytest.approx(3.0), pytest.approx(1.0)]
    assert result["mean_steady"]["push"] == pytest.approx(0.2)
