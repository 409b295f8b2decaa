"""FedDyn: the bank's linear term and g_k on a tiny real model, and the server's h in a federation
(the banks' mean g_k, checkpointed) with alpha in every train message."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import (  # noqa: F401
    config,
    one_torch_thread,
    recorded_federation,
)
from flwr.app import MessageType
from safetensors.numpy import load_file
from test_training import built, quadrant_task, text_only

from fingpt_federated.client.feddyn import updated_gradient
from fingpt_federated.client.training import train_local
from fingpt_federated.federation import protocol
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.server.app import CHECKPOINTS
from fingpt_federated.server.feddyn import moved_h
from fingpt_federated.server.strategy_config import check_strategy

pytestmark = pytest.mark.usefixtures("tiny_setting")


def test_the_linear_term_is_a_loss_term_and_g_k_moves_by_minus_alpha_times_the_banks_step():
    """With SGD, two steps: the first from x (the quadratic term is zero there) adds lr * g_k to the plain
    step; the second also feels alpha * (w - x)."""
    train = text_only(quadrant_task(64, seed=3))
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=16, epochs=1, progress=False)
    model, tokenizer = built(num_features=0)
    x = federated_state(model)
    generator = torch.Generator().manual_seed(0)
    g_k = {name: torch.randn(value.shape, generator=generator) * 0.1 for name, value in x.items()}
    plain, dynamic = copy.deepcopy(model), copy.deepcopy(model)
    train_local(plain, tokenizer, train, cfg, max_steps=1)
    train_local(dynamic, tokenizer, train, cfg, max_steps=1, global_state=x, proximal_mu=0.5, linear_term=g_k)
    y_plain, y = federated_state(plain), federated_state(dynamic)
    for name in x:
        torch.testing.assert_close(y[name], y_plain[name] + cfg.lr * g_k[name])
    new = updated_gradient(g_k, x, y, alpha=0.5)
    for name in x:
        torch.testing.assert_close(new[name], g_k[name] - 0.5 * (y[name] - x[name]))
    assert any(not torch.equal(y[name], x[name]) for name in x)


def test_the_servers_h_is_the_mean_of_the_banks_g_k_and_corrects_the_average(tmp_path: Path):
    overrides = ("strategy=feddyn", "strategy.feddyn_alpha=0.5", "strategy.local_steps=3", "federation.rounds=2")
    grid = recorded_federation(tmp_path, *overrides)
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == 6
    assert all(m.content["config"][protocol.FEDDYN_ALPHA] == 0.5 for m in sent)
    assert all(m.content["config"][protocol.PROXIMAL_MU] == 0.0 for m in sent)  # the bank uses alpha for it
    assert all(set(m.content.array_records) == {protocol.ARRAYS} for m in sent)  # nothing else travels
    banks = [load_file(str(p)) for p in sorted((tmp_path / "data").glob("bank_*/state/feddyn/run.safetensors"))]
    assert len(banks) == 3
    saved = load_file(str(tmp_path / "run" / CHECKPOINTS / "round_0002" / "server_state.safetensors"))
    moved = [name for name in banks[0] if np.abs(banks[0][name]).max() > 0]
    assert moved
    for name in banks[0]:  # every bank took part in both rounds, all of 48 rows: h = mean of the g_k
        mean = sum(bank[name] for bank in banks) / 3
        np.testing.assert_allclose(saved[f"h:dict:{name}"], mean, rtol=1e-4, atol=1e-6)
    # round 1: h = -alpha (mean - x), so the global is mean - h / alpha = 2 mean - x (equal banks, all replying)
    replies = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN][:3]
    x = {n: a.numpy() for n, a in sent[0].content[protocol.ARRAYS].items()}
    second = {n: a.numpy() for n, a in sent[3].content[protocol.ARRAYS].items()}
    for name in x:
        mean = sum(r.content[protocol.ARRAYS][name].numpy() for r in replies) / 3
        np.testing.assert_allclose(second[name], 2 * mean - x[name], rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(second[name], x[name]) for name in moved)


def test_the_servers_h_moves_by_alpha_times_the_share_of_banks_averaged():
    h = moved_h({}, {"w": np.array([1.0, 3.0], np.float32)}, {"w": np.array([0.0, 1.0], np.float32)}, 0.1, 0.5)
    np.testing.assert_allclose(h["w"], [-0.05, -0.1])
    again = moved_h(h, {"w": np.array([1.0, 1.0], np.float32)}, {"w": np.array([1.0, 2.0], np.float32)}, 0.1, 1.0)
    np.testing.assert_allclose(again["w"], [-0.05, 0.0])


@pytest.mark.parametrize(
    ("overrides", "encrypted", "message"),
    [
        ([], True, "needs the plaintext average"),
        (["strategy.scaffold=true"], False, "two drift corrections"),
        (["strategy.mu=0.01"], False, "leave mu at 0"),
        (["strategy.feddyn_alpha=-1"], False, "must be >= 0"),
    ],
)
def test_feddyn_is_refused_where_it_cannot_work(overrides, encrypted, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(config("strategy=feddyn", *overrides), encrypted=encrypted)
