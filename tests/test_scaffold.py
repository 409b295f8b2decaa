"""SCAFFOLD: the bank's corrected steps and new control variate on a tiny real model, and the server's
variate in a federation (the mean of the banks' own, checkpointed, sent with every train message)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import (  # noqa: F401
    config,
    one_torch_thread,
    recorded_federation,
)
from flwr.app import Array, ArrayRecord, MessageType
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file
from test_training import built, quadrant_task, text_only

from fingpt_federated.client.app import evaluate_global
from fingpt_federated.client.app import train as client_train
from fingpt_federated.client.scaffold import correction, updated_variate
from fingpt_federated.client.training import reached_parameters, train_local
from fingpt_federated.federation import protocol
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.server.app import CHECKPOINTS, METRICS_JSON
from fingpt_federated.server.scaffold import moved_control
from fingpt_federated.server.strategy_config import check_strategy

pytestmark = pytest.mark.usefixtures("tiny_setting")


def test_a_corrected_step_moves_by_lr_times_c_minus_ci_and_the_new_variate_is_the_banks_own_step():
    """With SGD, one step: y = x - lr * (g + c - c_i); option II's c_i+ is then g, the uncorrected step."""
    train = text_only(quadrant_task(64, seed=3))
    cfg = TrainConfig(optimizer="sgd", lr=0.05, momentum=0.0, weight_decay=0.0, batch_size=16, epochs=1, progress=False)
    model, tokenizer = built(num_features=0)
    x = federated_state(model)
    generator = torch.Generator().manual_seed(0)
    server = {name: torch.randn(value.shape, generator=generator) * 0.1 for name, value in x.items()}
    bank = {name: torch.randn(value.shape, generator=generator) * 0.1 for name, value in x.items()}
    plain, corrected = copy.deepcopy(model), copy.deepcopy(model)
    train_local(plain, tokenizer, train, cfg, max_steps=1)
    train_local(corrected, tokenizer, train, cfg, max_steps=1, drift_correction=correction(server, bank))
    y_plain, y = federated_state(plain), federated_state(corrected)
    assert sorted(reached_parameters(model, train)) == sorted(
        x
    )  # every tensor is stepped (a LoRA A too, with zero gradient)
    new = updated_variate(bank, server, x, y, steps=1, lr=cfg.lr)
    for name in x:
        torch.testing.assert_close(y[name], y_plain[name] - cfg.lr * (server[name] - bank[name]))
        torch.testing.assert_close(new[name], (x[name] - y_plain[name]) / cfg.lr, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(y_plain[name], x[name]) for name in x)


def test_the_servers_variate_is_the_mean_of_the_banks_and_travels_with_every_train_message(tmp_path: Path):
    grid = recorded_federation(tmp_path, "strategy=scaffold", "strategy.local_steps=3", "federation.rounds=2")
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert len(sent) == 6 and all(protocol.CONTROL in m.content.array_records for m in sent)
    first = {n: a.numpy() for n, a in sent[0].content[protocol.CONTROL].items()}
    assert all(not value.any() for value in first.values())  # c starts at zero
    banks = [load_file(str(p)) for p in sorted((tmp_path / "data").glob("bank_*/state/scaffold/run.safetensors"))]
    assert len(banks) == 3
    saved = load_file(str(tmp_path / "run" / CHECKPOINTS / "round_0002" / "server_state.safetensors"))
    second = {n: a.numpy() for n, a in sent[3].content[protocol.CONTROL].items()}
    moved = [name for name in first if np.abs(banks[0][name]).max() > 0]
    assert moved and any(np.abs(second[name]).max() > 0 for name in moved)
    for name in first:  # every bank took part in both rounds, all of 48 rows: c = mean of the c_i
        mean = sum(bank[name] for bank in banks) / 3
        np.testing.assert_allclose(saved[f"control:dict:{name}"], mean, rtol=1e-5, atol=1e-7)


def test_scaffold_is_refused_under_encryption():
    with pytest.raises(ValueError, match="strategy.scaffold: SCAFFOLD's control variates"):
        check_strategy(config("strategy=scaffold"), encrypted=True)


def test_the_servers_variate_moves_by_the_example_weighted_changes_of_the_banks_that_replied():
    control = {"w": np.zeros(2, np.float32)}
    changes = [({"w": np.array([1.0, 0.0], np.float32)}, 30.0), ({"w": np.array([0.0, 4.0], np.float32)}, 10.0)]
    moved = moved_control(control, changes, banks=2)["w"]  # every bank replied: the weighted mean
    np.testing.assert_allclose(moved, [0.75, 1.0])
    np.testing.assert_allclose(moved_control(control, changes, banks=4)["w"], [0.375, 0.5])  # half the banks: |S|/N


def control_booster(factor: float) -> ClientApp:
    """The real ClientApp, except that bank_0 (node 1) multiplies its control variate change by `factor`:
    SCAFFOLD adds it into c, which corrects every bank's local steps, while its update stays honest."""
    app = ClientApp()

    @app.train()
    def _(msg, context):
        reply = client_train(msg, context)
        if context.node_id == 1:
            change = reply.content[protocol.CONTROL_UPDATE]
            reply.content[protocol.CONTROL_UPDATE] = ArrayRecord(
                {name: Array(array.numpy() * np.float32(factor)) for name, array in change.items()}
            )
        return reply

    app.evaluate()(evaluate_global)
    return app


def bank_variate(root: Path, bank: int) -> dict[str, np.ndarray]:
    return load_file(str(root / "data" / f"bank_{bank}" / "state" / "scaffold" / "run.safetensors"))


def norm(tensors: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values())))


def saved_control(run: Path, server_round: int) -> dict[str, np.ndarray]:
    saved = load_file(str(run / CHECKPOINTS / f"round_{server_round:04d}" / "server_state.safetensors"))
    return {name.removeprefix("control:dict:"): value for name, value in saved.items() if name.startswith("control:")}


def test_a_huge_control_variate_change_is_refused_and_c_is_the_others(tmp_path: Path):
    recorded_federation(
        tmp_path, "strategy=scaffold", "strategy.local_steps=3", "federation.rounds=1", app=control_booster(1e4)
    )
    history = json.loads((tmp_path / "run" / METRICS_JSON).read_text())["rows"]
    failed = [row for row in history if row["status"] == "failed"]
    assert [(row["bank"], row["phase"]) for row in failed] == [("bank_0", "train")]
    assert "control variate change norm" in failed[0]["reason"] and "max_norm_ratio=10" in failed[0]["reason"]
    banks = [bank_variate(tmp_path, i) for i in (1, 2)]
    for name, value in saved_control(tmp_path / "run", 1).items():  # c_i started at 0: each change is c_i+
        np.testing.assert_allclose(value, (2 / 3) * (banks[0][name] + banks[1][name]) / 2, rtol=1e-5, atol=1e-7)


def test_with_clipping_a_huge_control_variate_change_weighs_as_the_rounds_median(tmp_path: Path):
    recorded_federation(
        tmp_path,
        "strategy=scaffold",
        "strategy.local_steps=3",
        "federation.rounds=1",
        "strategy.update_checks.max_norm_ratio=null",
        "strategy.update_checks.clip_norm_ratio=1.0",
        app=control_booster(1e4),
    )
    history = json.loads((tmp_path / "run" / METRICS_JSON).read_text())["rows"]
    train = {row["bank"]: row for row in history if row["phase"] == "train" and row["status"] == "ok"}
    assert set(train) == {"bank_0", "bank_1", "bank_2", "federation"}
    assert train["bank_0"]["metrics"]["control_clip_scale"] < 1e-3
    assert all(train[bank]["metrics"]["control_norm"] > 0 for bank in ("bank_0", "bank_1", "bank_2"))
    honest = [
        load_file(str(tmp_path / "data" / f"bank_{i}" / "state" / "scaffold" / "run.safetensors")) for i in (1, 2)
    ]
    honest_norm = max(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in bank.values())) for bank in honest)
    control = saved_control(tmp_path / "run", 1)
    # c is the mean of three changes, none above the median's norm: no larger than the largest honest one
    assert np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in control.values())) <= honest_norm * 1.0001
