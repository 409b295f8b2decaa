"""The ServerApp's Grid with a shorter wait for replies, and a record of when each round's messages moved.

Flower 1.41's deployed Grid (`flwr.superlink.grid.http_grid`) pushes a round's messages, then
asks the SuperLink for replies and sleeps a fixed 3 s between asks, a constant in its code: the
last bank's reply waits there 1.5 s on average, up to 3 s, every round. `PollingGrid` wraps any
Grid and replaces only `send_and_receive`: the same push, then the same pulls, with a wait that
starts at 0.1 s (Flower's in-memory simulation Grid's default) and grows with the time already
waited (5 % of it, at most 1 s), so a slow round does not ask the SuperLink more than once a second.

Every call is recorded (`sends`, wall-clock `time.time()` so that the banks' logs on the same
machine line up with it): when it started, when the messages were pushed, when each reply was
pulled and from which node (and when that pull began: Flower's pull also fetches the reply's
objects, retrying after 1 s, then 2 s..., those the bank has not finished uploading), and when it
returned. RoundEnd (server/app.py) writes them per round
to `timings.json`; bench_deploy breaks a round down with them.

Model state travels packed (federation/wire_pack.py): `send_and_receive` packs each message's
ArrayRecords right before the push and unpacks each reply right after its pull, so strategies
and update checks see the records they always saw. A reply whose packed records fail the checks
(arrays the message did not carry, a malformed manifest) becomes an error reply naming the fault:
that bank's failure of the round, like any other (server/replies.py). This Grid wraps Flower's in
a simulation too, so simulations take the same path.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from flwr.app import Error, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fingpt_federated.federation import wire_pack

MIN_POLL_S = 0.1
MAX_POLL_S = 1.0
POLL_SHARE = 0.05


def poll_wait(waited_s: float) -> float:
    """Seconds to wait before the next ask for replies, `waited_s` after the messages were pushed."""
    return min(MAX_POLL_S, max(MIN_POLL_S, POLL_SHARE * waited_s))


@dataclass
class SendRecord:
    """One `send_and_receive`: wall-clock times of its steps."""

    group: str
    kind: str
    started: float
    pushed: float = 0.0
    replies: dict[int, float] = field(default_factory=dict)  # source node id -> when its reply was pulled
    pull_started: dict[int, float] = field(default_factory=dict)  # ... when the pull that brought it began
    ended: float = 0.0
    pulls: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "kind": self.kind,
            "started": self.started,
            "pushed": self.pushed,
            "replies": {str(node): at for node, at in self.replies.items()},
            "pull_started": {str(node): at for node, at in self.pull_started.items()},
            "ended": self.ended,
            "pulls": self.pulls,
        }


class PollingGrid(Grid):
    """`grid` with `send_and_receive` polling at `poll_wait`; everything else is `grid`'s own."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sends: list[SendRecord] = []

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull their replies until all came or `timeout` seconds passed.

        A message the SuperLink refused (a None id) is not waited for; Flower's own loop would wait
        out the whole timeout for it.
        """
        messages = list(messages)
        first = messages[0].metadata if messages else None
        record = SendRecord(
            group=first.group_id if first else "", kind=first.message_type if first else "", started=time.time()
        )
        self.sends.append(record)
        pushed_ids = self.push_messages([_packed(message) for message in messages])
        carried = {  # what each reply may carry back: the array names of the message it answers
            message_id: wire_pack.array_names(message.content)
            for message_id, message in zip(pushed_ids, messages, strict=True)
            if message_id and message.has_content()
        }
        waiting = {message_id for message_id in pushed_ids if message_id}
        record.pushed = time.time()
        pushed = time.monotonic()
        end = None if timeout is None else pushed + timeout
        replies: list[Message] = []
        while True:
            asked = time.time()
            pulled = list(self.pull_messages(waiting)) if waiting else []
            record.pulls += bool(waiting)
            now = time.time()
            for reply in pulled:
                record.replies[reply.metadata.src_node_id] = now
                record.pull_started[reply.metadata.src_node_id] = asked
                waiting.discard(reply.metadata.reply_to_message_id)
            replies.extend(
                _unpacked(reply, carried.get(reply.metadata.reply_to_message_id, frozenset())) for reply in pulled
            )
            if not waiting or (end is not None and time.monotonic() >= end):
                break
            time.sleep(poll_wait(time.monotonic() - pushed))
        record.ended = time.time()
        return replies


def _packed(message: Message) -> Message:
    """`message` with its ArrayRecords packed for the wire (a copy; `message` itself is not changed)."""
    if not message.has_content():
        return message
    content = wire_pack.pack(message.content)
    if not wire_pack.is_packed(content):
        return message
    return make_message(copy.copy(message.metadata), content=content)


def _unpacked(reply: Message, carried: Collection[str]) -> Message:
    """`reply` with its packed records restored, or an error reply naming why they cannot be."""
    if not reply.has_content() or not wire_pack.is_packed(reply.content):
        return reply
    try:
        content = wire_pack.unpack(reply.content, carried)
    except wire_pack.PackError as exc:
        return make_message(reply.metadata, error=Error(ErrorCode.UNKNOWN, f"packed reply refused: {exc}"))
    return make_message(reply.metadata, content=content)
