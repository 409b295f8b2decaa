"""Test doubles for the federation tests: small banks on disk, and a Grid that calls ClientApps in-process.

`InProcessGrid` delivers each message to a ClientApp in this process, as the simulation engine
would in a Ray actor, and turns an exception into an error reply, as Flower does. It lets the
ServerApp's logic (rounds, failures, checkpoints, resume) run in seconds, without Ray.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.client.app import app as client_app
from fingpt_federated.conf import compose_config
from fingpt_federated.data.bank_data import BankData, save_bank
from fingpt_federated.data.records import BankDataset
from fingpt_federated.federation import protocol
from fingpt_federated.federation.federation_spec import BankSite, FederationSpec
from fingpt_federated.server.app import run_federation

CLASSES = ["bearish", "bullish", "neutral"]
SKEWED = ([0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8])
_WORDS = {
    0: ["plunged", "slumped", "missed", "downgraded", "losses"],
    1: ["surged", "beat", "upgraded", "record", "profits"],
    2: ["scheduled", "announced", "held", "reported", "meeting"],
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on a small shared CI machine, torch's default of one per core spins
    against the other processes and made a 6-step tiny-model update take seconds instead of 50 ms."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(*overrides: str, model: str = "tiny_encoder") -> DictConfig:
    """The root config composed as `fingpt-sim` composes it (tiny encoder by default), plus overrides.

    A simulation gets one Ray CPU, hence one ClientApp actor, unless the overrides say otherwise: the
    suite already runs two tests at once on a 2-core machine, and every actor pays 6 s of imports
    (torch, transformers, PEFT) before its first bank; one actor per run took a 5-bank run from 41 to
    24 CPU-seconds (measured)."""
    own_resources = any(o.startswith(("simulation.total_cpus", "simulation.ray_address")) for o in overrides)
    return compose_config([f"model={model}", *([] if own_resources else ["simulation.total_cpus=1"]), *overrides])


def tiny_model() -> dict:
    return OmegaConf.to_container(config().model, resolve=True)


def server_identity() -> None:
    """Messages created outside a Flower runtime need the task identity the SuperLink would set."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def client_message(
    state,
    message_type: str = MessageType.TRAIN,
    *,
    server_round: int = 1,
    mu: float | None = None,
    local_steps: int = 6,
    dp: dict | None = None,
    state_hash: str | None = None,
) -> Message:
    """A round's message to one ClientApp, as the ServerApp sends it (tiny encoder, 4 local epochs)."""
    server_identity()
    arrays = protocol.state_to_record(state)
    config = protocol.task_config(
        tiny_model(), CLASSES, 0, local_epochs=4, local_steps=local_steps, dp=dp, dp_run="run" if dp is not None else ""
    )
    config[protocol.SERVER_ROUND] = server_round
    config[protocol.STATE_HASH] = state_hash or protocol.record_hash(arrays)
    if mu is not None:
        config[protocol.PROXIMAL_MU] = mu
    content = RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: config})
    return Message(content, dst_node_id=1, message_type=message_type)


def node_context(node_config: dict, run_config: dict | None = None) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config or {})


def trained(reply: Message):
    """The state and metrics of a train reply (which must not be an error)."""
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    return protocol.record_to_state(reply.content[protocol.ARRAYS]), reply.content[protocol.METRICS]


def state_distance(a, b) -> float:
    return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def news(n: int, label_share: list[float], seed: int) -> BankDataset:
    """Headlines of three sentiment words that give the label away: learnable in a few steps, so
    that a test measures the federation, not the model's capacity."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=label_share)
    texts = [" ".join(["acme", *rng.choice(_WORDS[int(y)], size=3)]) for y in labels]
    return BankDataset(texts=texts, series=None, mask=None, labels=labels, class_names=list(CLASSES))


def write_bank(folder: Path, name: str, label_share: list[float], seed: int, rows: int = 48) -> Path:
    data = news(rows + 16, label_share, seed)
    bank = BankData(name=name, train=data.subset(range(rows)), valid=data.subset(range(rows, rows + 16)))
    return save_bank(bank, folder)


def write_news_csv(path: Path, rows: int, seed: int = 5) -> Path:
    """A balanced table of `news` headlines (text, sentiment), for the data pipeline of fingpt-sim."""
    data = news(rows, [1 / 3] * 3, seed)
    frame = pd.DataFrame({"text": data.texts, "sentiment": [CLASSES[y] for y in data.labels]})
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def news_data_overrides(csv_path: Path) -> list[str]:
    """Point the synthetic_news data config at a `write_news_csv` table instead of generating one."""
    return [
        "data=synthetic_news",
        "data.name=keyword_news",
        "data.synthetic=null",
        f"data.files.train={csv_path}",
        "data.keep_columns=[]",
    ]


def write_federation(root: Path, *, fail: Iterable[int] = (), work: dict[int, float] | None = None) -> FederationSpec:
    """Three label-skewed banks and a balanced test set, as a FederationSpec saved at root/spec.json."""
    banks = []
    for i, share in enumerate(SKEWED):
        path = write_bank(root / f"bank_{i}", f"bank_{i}", list(share), seed=i)
        banks.append(BankSite(str(path), f"bank_{i}", (work or {}).get(i, 1.0), i in set(fail)))
    test = save_bank(BankData("test", news(60, [1 / 3] * 3, seed=99), None), root / "test")
    spec = FederationSpec(list(CLASSES), 0, str(test), banks)
    spec.save(root / "spec.json")
    return spec


def simulated_nodes(spec_path: Path, count: int) -> tuple[list[dict], dict]:
    """Node configs and run config of `count` simulated banks reading the FederationSpec."""
    return [{protocol.NODE_PARTITION_ID: i} for i in range(count)], {protocol.RUN_SPEC_PATH: str(spec_path)}


class PushPullGrid(Grid):
    """A stand-in SuperLink for tests of the ServerApp's own polling (server/reply_poll.py): subclasses
    say which nodes exist and what a push and a pull do; the rest of Flower's Grid is not used."""

    def set_run(self, run) -> None:  # noqa: ANN001 - unused
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201 - unused
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("PollingGrid must not call the wrapped grid's own send_and_receive")

    @staticmethod
    def reply(message: Message, content: RecordDict) -> Message:
        """`content` as the reply of the node `message` went to."""
        reply = Message(content, reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
        return reply


class InProcessGrid(Grid):
    """Nodes 1..N, node i served by `client_app` with node config `node_configs[i-1]`."""

    def __init__(self, client_app: ClientApp, node_configs: list[dict], run_config: dict | None = None) -> None:
        server_identity()
        self.client_app = client_app
        self.contexts = {
            i + 1: Context(
                run_id=1, node_id=i + 1, node_config=config, state=RecordDict(), run_config=dict(run_config or {})
            )
            for i, config in enumerate(node_configs)
        }
        self.sent: list[Message] = []

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's Run, unused here
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for original in messages:
            # A copy, as the wire gives: Flower's strategies reuse one ConfigRecord for every round.
            message = Message(
                copy.deepcopy(original.content),
                dst_node_id=original.metadata.dst_node_id,
                message_type=original.metadata.message_type,
            )
            self.sent.append(message)
            try:
                replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # noqa: BLE001 - Flower turns any ClientApp exception into an error reply
                replies.append(Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message))
        return replies


class RecordingGrid(InProcessGrid):
    """Keeps every reply, as the operator's side of the wire sees it."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.replies = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies


def recorded_federation(root: Path, *overrides: str, app: ClientApp = client_app) -> RecordingGrid:
    """`write_federation`'s three banks under `root / "data"` (bank_i on node i + 1), federated in-process by
    `app` with `overrides` into `root / "run"`; the grid keeps every message sent and every reply."""
    spec = write_federation(root / "data")
    nodes, run_config = simulated_nodes(root / "data" / "spec.json", len(spec.banks))
    grid = RecordingGrid(app, nodes, run_config)
    run_federation(grid, config(*overrides), spec, root / "run")
    return grid
