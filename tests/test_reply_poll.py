"""The ServerApp's reply wait (server/reply_poll.py): replies are picked up within a fraction of a
second, not after Flower's fixed 3 s, every send is recorded, a refused message is not waited for,
and a missing reply ends the wait at the timeout; RoundEnd writes each round's sends to timings.json."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import numpy as np
import pytest
from federation_helpers import PushPullGrid, server_identity
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fingpt_federated.server.app import RoundEnd
from fingpt_federated.server.checkpoint import Checkpointer
from fingpt_federated.server.history import History
from fingpt_federated.server.reply_poll import MAX_POLL_S, MIN_POLL_S, PollingGrid, poll_wait
from fingpt_federated.server.run_folder import TIMINGS_JSON


class TimedGrid(PushPullGrid):
    """A stand-in SuperLink: node i's reply becomes available `delays[i]` seconds after the push;
    a node listed in `refused` gets no message id (the SuperLink refused it)."""

    def __init__(self, delays: dict[int, float], refused: frozenset[int] = frozenset()) -> None:
        self.delays = delays
        self.refused = refused
        self.pending: dict[str, tuple[float, Message]] = {}
        self.pulls = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.delays)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for number, message in enumerate(messages):
            node = message.metadata.dst_node_id
            if node in self.refused:
                ids.append("")
                continue
            message.metadata.__dict__["_message_id"] = f"m{number}"
            self.pending[f"m{number}"] = (time.monotonic() + self.delays[node], message)
            ids.append(f"m{number}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        now, replies = time.monotonic(), []
        for message_id in list(message_ids):
            ready, message = self.pending.get(message_id, (float("inf"), None))
            if message is not None and ready <= now:
                del self.pending[message_id]
                replies.append(self.reply(message, RecordDict({"metrics": MetricRecord({"n": 1})})))
        return replies


def messages(nodes: Iterable[int]) -> list[Message]:
    server_identity()
    return [Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN, group_id="7") for node in nodes]


def test_the_wait_starts_short_and_grows_with_the_time_waited_up_to_a_second():
    assert poll_wait(0.0) == MIN_POLL_S == 0.1
    assert poll_wait(10.0) == pytest.approx(0.5)
    assert poll_wait(600.0) == MAX_POLL_S == 1.0  # Flower's own wait is 3 s whatever the round


def test_replies_are_picked_up_within_a_fraction_of_a_second_and_recorded_per_node():
    grid = PollingGrid(TimedGrid({1: 0.05, 2: 0.4}))
    started = time.monotonic()
    replies = list(grid.send_and_receive(messages([1, 2]), timeout=30))
    waited = time.monotonic() - started
    assert sorted(reply.metadata.src_node_id for reply in replies) == [1, 2]
    assert 0.4 <= waited < 0.8  # Flower's loop: 3 s
    (send,) = grid.sends
    assert (send.group, send.kind) == ("7", MessageType.TRAIN)
    assert send.started <= send.pushed <= send.replies[1] <= send.replies[2] <= send.ended
    assert send.replies[2] - send.pushed >= 0.4 and send.pulls >= 3
    assert send.pushed <= send.pull_started[2] <= send.replies[2] and send.replies[2] - send.pull_started[2] < 0.1


def test_a_refused_message_is_not_waited_for_and_a_missing_reply_ends_at_the_timeout():
    grid = PollingGrid(TimedGrid({1: 0.0, 2: 0.0}, refused=frozenset({2})))
    started = time.monotonic()
    assert [r.metadata.src_node_id for r in grid.send_and_receive(messages([1, 2]), timeout=30)] == [1]
    assert time.monotonic() - started < 0.5
    late = PollingGrid(TimedGrid({1: 0.0, 2: 60.0}))
    started = time.monotonic()
    assert [r.metadata.src_node_id for r in late.send_and_receive(messages([1, 2]), timeout=0.5)] == [1]
    assert 0.5 <= time.monotonic() - started < 1.0
    assert list(late.sends[0].replies) == [1]


def test_no_messages_no_pull():
    inner = TimedGrid({})
    grid = PollingGrid(inner)
    assert list(grid.send_and_receive([], timeout=5)) == [] and inner.pulls == 0
    assert grid.sends[0].pulls == 0


def test_the_serverapp_writes_each_rounds_sends_to_timings_json(tmp_path):
    grid = PollingGrid(TimedGrid({1: 0.0}))
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    end = RoundEnd(tmp_path, History(), Checkpointer(tmp_path / "ckpt", None, 1), 0, 1, arrays, sends=grid.sends)
    end(0, arrays)
    list(grid.send_and_receive(messages([1]), timeout=5))
    end(1, arrays)
    (timing,) = json.loads((tmp_path / TIMINGS_JSON).read_text())["rounds"]
    (send,) = timing["sends"]
    assert timing["round"] == 1 and list(send["replies"]) == ["1"]
    assert timing["started"] <= send["started"] <= send["ended"] <= timing["ended"] <= timing["saved"]
    assert grid.sends == []  # written once, then dropped: a long run's record does not grow
