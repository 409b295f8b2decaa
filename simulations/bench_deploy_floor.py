"""Flower's own floor, for bench_deploy: a trivial ServerApp and ClientApp (no torch, no model).

The ServerApp sends every connected node one train message a round (a 1,000-value array, as
small as a message gets) and waits for all replies; the ClientApp echoes the array back. What a
round costs here is Flower's messaging alone over the same TLS, node authentication, gateway and
SuperNodes as the real run: polling, process starts, serialisation. It waits for replies as the
real ServerApp does (server/reply_poll.py). Round times and the record of each round's messages
go to `RUN_DIR/floor.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fingpt_federated.server.reply_poll import PollingGrid

FLOOR_FILE = "floor.json"
RUN_DIR_KEY = "floor-run-dir"
ROUNDS_KEY = "floor-rounds"
ROUND_TIMEOUT_S = 600.0

client = ClientApp()
server = ServerApp()


@client.train()
def echo(msg: Message, _context: Context) -> Message:
    content = RecordDict({"arrays": msg.content.array_records["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)


@server.main()
def rounds(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config[RUN_DIR_KEY]))
    polling = PollingGrid(grid)
    nodes = list(polling.get_node_ids())
    arrays = ArrayRecord({"w": Array(np.zeros(1000, dtype=np.float32))})
    seconds: list[float] = []
    for number in range(1, int(context.run_config[ROUNDS_KEY]) + 1):
        started = time.perf_counter()
        messages = [
            Message(
                RecordDict({"arrays": arrays}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(number),
            )
            for node in nodes
        ]
        replies = list(polling.send_and_receive(messages, timeout=ROUND_TIMEOUT_S))
        failed = [reply for reply in replies if reply.has_error()]
        if len(replies) != len(nodes) or failed:
            raise RuntimeError(f"floor round {number}: {len(replies)} replies of {len(nodes)}, {len(failed)} errors")
        seconds.append(time.perf_counter() - started)
    record = {"nodes": len(nodes), "round_seconds": seconds, "sends": [send.to_json() for send in polling.sends]}
    (out / FLOOR_FILE).write_text(json.dumps(record), encoding="utf-8")
