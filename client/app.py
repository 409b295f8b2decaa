"""The bank's ClientApp, kept thin: it imports no torch, no transformers and no model code.

In a deployment Flower (1.41) starts a fresh `flwr-clientapp` process for every message, which
serves that one message and exits, in either isolation mode. What is heavy therefore lives
elsewhere:

- a deployed bank started with `fingpt-client start` (the default, `--worker`) has a long-lived
  worker process (client/worker.py) that holds torch, the backbone and the bank's validated data;
  `fingpt-client` passes its socket in the node config (`worker-socket`), and this app hands the
  message to it over that private Unix socket (client/worker_channel.py) and returns its reply;
- otherwise (a simulation, whose Ray actors live for the whole run, or `fingpt-client start
  --no-worker`) the work runs here, in this process (client/worker_task.py, imported only then).

Either way the bank's work is the same code, `worker_task.handle`; a failure there raises here,
and Flower counts it as this bank's failure of the round.

Model state arrives packed from the ServerApp (federation/wire_pack.py: one array per ArrayRecord,
few objects for Flower to move): it is unpacked here, as soon as it arrives, so the worker and
`worker_task` see the records the operator's strategy built; the reply is packed here, as it leaves,
when the message came packed (a ServerApp that does not pack gets its replies as it sent).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fingpt_federated.client import worker_channel
from fingpt_federated.federation import wire_pack

if TYPE_CHECKING:
    from fingpt_federated.model.train_config import TrainConfig

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global state on the bank's data (FedProx when proximal-mu > 0); reply with the new state."""
    return Message(content=handle("train", msg, context), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Metrics of the global model on this bank's validation split (never used for training)."""
    return Message(content=handle("evaluate", msg, context), reply_to=msg)


def handle(kind: str, msg: Message, context: Context) -> RecordDict:
    """The reply content, packed for the wire when the message came packed."""
    content = wire_pack.unpack(msg.content)
    reply = _reply(kind, msg, content, context)
    return wire_pack.pack(reply) if wire_pack.is_packed(msg.content) else reply


def _reply(kind: str, msg: Message, content: RecordDict, context: Context) -> RecordDict:
    """From the bank's worker when the node config names one, else computed here."""
    socket_path = context.node_config.get(worker_channel.NODE_WORKER_SOCKET)
    if socket_path:
        timing = {"round": msg.metadata.group_id, "process": worker_channel.process_started(), "handler": time.time()}
        meta = {
            "run_id": context.run_id,
            "node_id": context.node_id,
            "run_config": dict(context.run_config),
            "timing": timing,
        }
        return worker_channel.request(Path(str(socket_path)), kind, content, meta)
    from fingpt_federated.client import worker_task  # torch and the model: only where the work runs here

    return worker_task.handle(kind, content, context)


def planned_steps(num_rows: int, cfg: TrainConfig, local_steps: int | None) -> int:
    """Optimizer steps of a full round's local work: `epochs` passes, capped at `local_steps`."""
    full = cfg.epochs * math.ceil(num_rows / cfg.batch_size)
    return full if local_steps is None else min(full, local_steps)
