"""Where a deployed round's wall time goes, for bench_deploy: from timestamps the run already writes.

Sources, all wall-clock times on the one machine of the benchmark:
- the ServerApp's `timings.json` (server/app.py, server/reply_poll.py): each round's start, when
  its train messages were pushed, when each bank's reply was pulled, when the round ended;
- the banks' worker lines (`fingpt-timing {...}`, client/worker.py) in each bank's log: when the
  `flwr-clientapp` process started, when its handler ran, when the worker received, decoded,
  handled, encoded and sent back the message.

A round is followed along its critical path, the bank whose reply the ServerApp pulled last (its
worker line is the one whose handler ran between the push and that pull: Flower's strategies send
no round in the message's group id):

    configure    round start -> push starts (the strategy's configure_train)
    push         pushing the messages to the SuperLink
    to_clientapp push done -> that bank's flwr-clientapp process starts (the SuperNode's pull wait,
                 3 s between pulls in Flower 1.41, the SuperExec's poll, the process start)
    clientapp    process start -> the app's handler (Python and Flower imports, loading the app,
                 pulling the message from the SuperNode)
    to_worker    handler -> the worker has the whole request (connecting, sending it)
    worker       the worker's decode, `handle` (which holds the bank's reported training time)
                 and encode, and sending the reply back
    to_server    reply sent to the ClientApp -> the ServerApp pulled it (the ClientApp returns,
                 Flower pushes the reply to the SuperNode, which looks for replies every 0.5 s and
                 pushes it on to the SuperLink, where the ServerApp's reply poll finds it); of it,
                 `reply_pull` is the pull that brought it (fetching its objects, with Flower's
                 1 s, 2 s... retries for objects not uploaded yet)
    after        the ServerApp pulled the last reply -> the round ends (aggregation, update checks)

Their sum is the round's wall time (`round_seconds`). `round_end` (central evaluation, checkpoint
and metrics files) comes after and is not in it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fingpt_federated.client.worker import TIMING_PREFIX

STEPS = ("configure", "push", "to_clientapp", "clientapp", "to_worker", "worker", "to_server", "after")


def worker_lines(logs: Iterable[Path]) -> list[dict[str, Any]]:
    """The workers' timing lines in the banks' logs (a torn or foreign line is skipped)."""
    lines = []
    for log in logs:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            at = line.find(TIMING_PREFIX)
            if at < 0:
                continue
            try:
                entry = json.loads(line[at + len(TIMING_PREFIX) :])
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                lines.append(entry)
    return lines


def round_breakdown(timing: dict[str, Any], lines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One round's steps in seconds along its critical path; None without a train send."""
    train = next((send for send in timing["sends"] if send["kind"] == "train"), None)
    if train is None or not train["replies"]:
        return None
    node, pulled = max(train["replies"].items(), key=lambda item: item[1])
    row: dict[str, Any] = {
        "round": timing["round"],
        "bank_node": int(node),
        "configure": train["started"] - timing["started"],
        "push": train["pushed"] - train["started"],
        "after": timing["ended"] - pulled,
        "round_end": timing["saved"] - timing["ended"],
        "reply_pulls": train["pulls"],
    }
    bank = next(
        (
            line
            for line in lines
            if line.get("kind") == "train"
            and str(line.get("node")) == node
            and train["pushed"] <= float(line.get("handler", 0.0)) <= pulled
        ),
        None,
    )
    if bank is None or bank.get("process") is None:  # per-message ClientApps, no worker: the server's side only
        row["bank_side"] = pulled - train["pushed"]
        return row
    row.update(
        {
            "to_clientapp": bank["process"] - train["pushed"],
            "clientapp": bank["handler"] - bank["process"],
            "to_worker": bank["received"] - bank["handler"],
            "worker": bank["sent"] - bank["received"],
            "worker_decode": bank["decoded"] - bank["received"],
            "worker_handle": bank["handled"] - bank["decoded"],
            "worker_encode": bank["encoded"] - bank["handled"],
            "to_server": pulled - bank["sent"],
        }
    )
    if node in train.get("pull_started", {}):
        row["reply_pull"] = pulled - train["pull_started"][node]
    return row


def breakdown(timings_path: Path, logs: Iterable[Path]) -> dict[str, Any]:
    """Per round and the mean over rounds 2.. of each step."""
    if not timings_path.exists():
        return {}
    lines = worker_lines(logs)
    rows = []
    for timing in json.loads(timings_path.read_text())["rounds"]:
        row = round_breakdown(timing, lines)
        if row is not None:
            rows.append(row)
    return {"rounds": rows, "mean_steady": steady_means(rows)}


def steady_means(rows: list[dict[str, Any]]) -> dict[str, float]:
    steady = rows[1:] or rows
    keys = [key for key in steady[0] if key not in ("round", "bank_node")] if steady else []
    return {key: statistics.mean(row[key] for row in steady if key in row) for key in keys}


def floor_breakdown(floor: dict[str, Any]) -> dict[str, Any]:
    """The floor's rounds: push, then the banks' side and the reply poll until the last reply (and the
    pull that brought that reply)."""
    rows = []
    for send in floor.get("sends", []):
        if not send["replies"]:
            continue
        node, last = max(send["replies"].items(), key=lambda item: item[1])
        row = {
            "round": int(send["group"]),
            "push": send["pushed"] - send["started"],
            "bank_side": last - send["pushed"],
            "reply_pulls": send["pulls"],
        }
        if node in send.get("pull_started", {}):
            row["reply_pull"] = last - send["pull_started"][node]
        rows.append(row)
    return {"rounds": rows, "mean_steady": steady_means(rows)}
