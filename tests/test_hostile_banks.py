"""Hostile banks (client/hostile.py) against the real ServerApp and ClientApp.

In-process (`InProcessGrid`, seconds): three label-skewed banks, one of them hostile; every
misbehaviour is refused (the run goes on with the others) or neutralised by averaging, and the
global state stays finite; when too few honest banks remain the run fails loudly. The last tests
run `fingpt-sim` itself on Flower's simulation engine (slow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (  # noqa: F401
    InProcessGrid,
    config,
    one_torch_thread,
    simulated_nodes,
    tiny_model,
    write_federation,
)
from flwr.app import ArrayRecord, ConfigRecord, MessageType
from flwr.serverapp.strategy import FedAvg
from safetensors.numpy import load_file

from fingpt_federated.client.app import app as client_app
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.federation import protocol
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state
from fingpt_federated.privacy.he_packing import EncryptedUpdate
from fingpt_federated.server.app import FINAL_STATE, run_federation
from fingpt_federated.server.bank_rounds import BankRounds, FederationRoundError
from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.simulations.encryption import bank_secrets, operator_paths
from fingpt_federated.simulations.sim import simulate

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HOSTILE = 1


def hostile_federation(
    tmp_path: Path,
    behaviours: dict[int, str],
    *overrides: str,
    strategy: str = "fedavg",
    grid=InProcessGrid,
    he: bool = False,
):
    """Three label-skewed banks, those of `behaviours` hostile; under `he` with the key ceremony done."""
    spec = write_federation(tmp_path / "data")
    banks = [dataclasses.replace(bank, hostile=behaviours.get(i, "")) for i, bank in enumerate(spec.banks)]
    spec = dataclasses.replace(spec, banks=banks)
    privacy = ["privacy=he"] if he else []
    cfg = config(f"strategy={strategy}", "strategy.local_steps=3", "federation.min_banks=2", *overrides, *privacy)
    if he:
        cfg = operator_paths(cfg, tmp_path / "run")
        spec = bank_secrets(cfg, tmp_path / "run", spec)
    spec.save(tmp_path / "data" / "spec.json")
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(banks))
    return cfg, spec, grid(client_app, nodes, run_config)


class StateRecordingGrid(InProcessGrid):
    """Keeps a copy of every train reply's state by bank (FedMedian takes the arrays out of the replies)."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.states: dict[str, dict] = {}

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                bank = str(reply.content[protocol.RECEIPT]["name"])
                self.states[bank] = protocol.record_to_state(reply.content[protocol.ARRAYS])
        return replies


def train_rows(history: History, bank: str) -> list:
    return [row for row in history.rows if row.phase == "train" and row.bank == bank]


def assert_finite(run_dir: Path) -> None:
    state = load_file(str(run_dir / FINAL_STATE))
    assert all(bool(np.isfinite(array).all()) for array in state.values())


@pytest.mark.parametrize(
    ("behaviour", "reasons"),
    [
        ("nan", ["18 non-finite values (NaN or infinite) in 18 tensors"] * 2),
        ("inf", ["18 non-finite values (NaN or infinite) in 18 tensors"] * 2),
        ("scale:100", ["above strategy.update_checks.max_norm_ratio=10"] * 2),
        ("wrong_shape", ["the state sent has float32"] * 2),
        ("replay", ["replayed state: it is the global state sent in round 1"] * 2),
        ("constant:1", ["above strategy.update_checks.max_norm_ratio=10"] * 2),
    ],
)
def test_a_hostile_update_is_refused_and_the_run_goes_on_with_the_others(tmp_path, behaviour, reasons):
    cfg, spec, grid = hostile_federation(tmp_path, {HOSTILE: behaviour}, "federation.rounds=2")
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    rows = train_rows(history, f"bank_{HOSTILE}")
    assert [row.status for row in rows] == ["failed", "failed"]
    assert all(expected in row.reason for row, expected in zip(rows, reasons, strict=True)), [r.reason for r in rows]
    for honest in ("bank_0", "bank_2"):
        assert [row.status for row in train_rows(history, honest)] == ["ok", "ok"]
        assert all(row.metrics["update_norm"] > 0 for row in train_rows(history, honest))
    assert_finite(tmp_path / "run")


def test_a_sign_flipped_update_within_the_bounds_is_averaged_with_the_others_and_a_replay_of_it_refused(tmp_path):
    """Out of reach of any check: a flipped update as large as an honest one. FedAvg weighs it as one
    bank of three; what the checks add is that the same state is never taken twice."""
    cfg, spec, grid = hostile_federation(tmp_path, {HOSTILE: "sign_flip"}, "federation.rounds=2")
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    assert [row.status for row in train_rows(history, f"bank_{HOSTILE}")] == ["ok", "ok"]
    assert_finite(tmp_path / "run")


def test_when_too_few_honest_banks_remain_the_run_fails_loudly_with_every_reason(tmp_path):
    cfg, spec, grid = hostile_federation(tmp_path, {0: "nan", 2: "wrong_shape"}, "federation.rounds=2")
    with pytest.raises(FederationRoundError) as error:
        run_federation(grid, cfg, spec, tmp_path / "run")
    message = str(error.value)
    assert "round 1 train: 1 of 3 sampled banks succeeded, the minimum is 2" in message
    assert "bank bank_0 (node 1): 18 non-finite values" in message
    assert "bank bank_2 (node 3): tensor" in message
    assert not (tmp_path / "run" / FINAL_STATE).exists()


def test_without_the_update_checks_a_non_finite_aggregate_still_stops_the_round(tmp_path):
    """Defence in depth: BankRounds refuses to adopt a non-finite aggregate whatever let it through."""
    _, spec, grid = hostile_federation(tmp_path, {HOSTILE: "nan"})
    rounds = BankRounds(FedAvg(min_train_nodes=3, min_available_nodes=3), min_banks=1, history=History())
    model, _ = build_model(tiny_model(), spec.num_classes, spec.num_features)
    arrays = ArrayRecord(federated_state(model))
    config = ConfigRecord(dict(protocol.task_config(tiny_model(), spec.class_names, 0, local_steps=2)))
    replies = grid.send_and_receive(rounds.configure_train(1, arrays, config, grid))
    with pytest.raises(FederationRoundError, match="round 1 train: the aggregate of 3 accepted updates holds non-fin"):
        rounds.aggregate_train(1, replies)


@pytest.mark.parametrize("strategy", ["fedmedian", "krum"])
def test_robust_aggregation_keeps_a_strongly_flipped_bank_out_of_the_global_state(tmp_path, strategy):
    """sign_flip:5 stays within 10 x the median norm, so the checks pass it; the robust rule keeps the
    global state nearer every honest bank than the flipped one (three banks: Krum scores each state
    by its nearest other one)."""
    cfg, spec, grid = hostile_federation(
        tmp_path, {HOSTILE: "sign_flip:5"}, "federation.rounds=1", strategy=strategy, grid=StateRecordingGrid
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    assert [row.status for row in train_rows(history, f"bank_{HOSTILE}")] == ["ok"]
    sent = protocol.record_to_state(
        next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN).content[protocol.ARRAYS]
    )
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    replies = grid.states
    flipped = replies[f"bank_{HOSTILE}"]
    distance = {name: _distance(final, state) for name, state in replies.items()}
    assert distance[f"bank_{HOSTILE}"] > max(d for n, d in distance.items() if n != f"bank_{HOSTILE}")
    assert _distance(final, sent) < _distance(flipped, sent)
    assert_finite(tmp_path / "run")


def _distance(a, b) -> float:
    return float(np.sqrt(sum(float(((np.asarray(a[n]) - np.asarray(b[n])) ** 2).sum()) for n in a)))


@pytest.mark.parametrize("bounded", ["", "median", "registered"])
def test_bounds_keep_an_inflated_scaled_bank_to_the_weight_and_norm_of_a_typical_one(tmp_path, bounded):
    """`scale:5+inflate:100` passes every refusal (5 x its norm is within 10 x the median): unbounded, its
    claimed 100 x count makes it most of the FedAvg mean; bounded, the aggregate is the weighted mean of
    the bounded replies, in which it has the median norm and weighs at most twice the median count
    (`median`) or its registered count (`registered`)."""
    limits = ["strategy.update_checks.clip_norm_ratio=1"] if bounded else []
    limits += ["strategy.update_checks.max_examples_ratio=2"] if bounded == "median" else []
    registry = {bank.name: len(load_bank(bank.path).train) for bank in write_federation(tmp_path / "data").banks}
    registered = [f"++strategy.update_checks.registered_examples.{bank}={count}" for bank, count in registry.items()]
    cfg, spec, grid = hostile_federation(
        tmp_path,
        {HOSTILE: "scale:5+inflate:100"},
        "federation.rounds=1",
        *limits,
        *(registered if bounded == "registered" else []),
        grid=StateRecordingGrid,
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    rows = {f"bank_{i}": train_rows(history, f"bank_{i}")[0] for i in range(3)}
    hostile, honest = rows.pop(f"bank_{HOSTILE}"), list(rows.values())
    assert hostile.status == "ok" and all(row.status == "ok" for row in honest)
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    sent = protocol.record_to_state(
        next(m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN).content[protocol.ARRAYS]
    )
    distance = {name: _distance(final, state) for name, state in grid.states.items()}
    _assert_evaluate_counts_bounded(history, bounded, registry)
    if not bounded:
        assert distance[f"bank_{HOSTILE}"] < min(d for n, d in distance.items() if n != f"bank_{HOSTILE}")
        return
    counts = sorted(float(row.metrics[protocol.NUM_EXAMPLES]) for row in honest)
    assert hostile.metrics["reported_examples"] > 50 * counts[-1]
    assert hostile.metrics[protocol.NUM_EXAMPLES] <= 2 * counts[-1] and hostile.metrics["clip_scale"] < 0.5
    if bounded == "registered":
        assert hostile.metrics[protocol.NUM_EXAMPLES] == registry[f"bank_{HOSTILE}"]
    weights = {f"bank_{HOSTILE}": float(hostile.metrics[protocol.NUM_EXAMPLES])}
    weights |= {row.bank: float(row.metrics[protocol.NUM_EXAMPLES]) for row in honest}
    scales = {f"bank_{HOSTILE}": hostile.metrics["clip_scale"]} | {
        row.bank: row.metrics.get("clip_scale", 1.0) for row in honest
    }
    total = sum(weights.values())
    for name in final:
        base = np.asarray(sent[name], dtype=np.float64)
        expected = base + sum(
            weights[b] / total * scales[b] * (np.asarray(grid.states[b][name], dtype=np.float64) - base)
            for b in weights
        )
        assert np.allclose(final[name], expected, atol=1e-5), name


def _assert_evaluate_counts_bounded(history: History, bounded: str | None, registry: dict[str, int]) -> None:
    """The inflated bank's evaluate count (its say in the validation metrics, which pick the published round)
    is capped as its train count is, and the federation's validation accuracy is the mean under the caps."""
    rows = {row.bank: row for row in history.rows if row.phase == "evaluate" and row.round == 1}
    federation = rows.pop(FEDERATION)
    hostile = rows[f"bank_{HOSTILE}"]
    honest = [float(row.metrics[protocol.NUM_EXAMPLES]) for name, row in rows.items() if name != hostile.bank]
    if not bounded:
        assert (
            float(hostile.metrics[protocol.NUM_EXAMPLES]) > 50 * max(honest)
            and "reported_examples" not in hostile.metrics
        )
        return
    assert hostile.metrics["reported_examples"] > 50 * max(honest)
    if bounded == "registered":  # the registry holds a bank's records, its train rows: 3 x its validation rows
        assert hostile.metrics[protocol.NUM_EXAMPLES] == registry[hostile.bank]
    else:
        assert float(hostile.metrics[protocol.NUM_EXAMPLES]) <= 2 * max(honest)
    counts = {name: float(row.metrics[protocol.NUM_EXAMPLES]) for name, row in rows.items()}
    weighted = sum(counts[name] * float(row.metrics["accuracy"]) for name, row in rows.items()) / sum(counts.values())
    assert float(federation.metrics["accuracy"]) == pytest.approx(weighted)


def test_a_bank_missing_from_the_registry_is_refused_in_training_and_evaluation(tmp_path):
    registered = [
        "++strategy.update_checks.registered_examples.bank_0=1000",
        "++strategy.update_checks.registered_examples.bank_1=1000",
    ]
    cfg, spec, grid = hostile_federation(tmp_path, {}, "federation.rounds=1", *registered)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    rows = [row for row in history.rows if row.bank == "bank_2"]
    assert {row.phase for row in rows} == {"train", "evaluate"} and all(row.status == "failed" for row in rows)
    assert all("bank_2 has no count in strategy.update_checks.registered_examples" in row.reason for row in rows)
    assert [row.status for row in train_rows(history, "bank_0")] == ["ok"]


def test_honest_dp_banks_pass_the_default_checks(tmp_path):
    cfg, spec, grid = hostile_federation(
        tmp_path,
        {},
        "privacy=dp",
        "privacy.dp.logical_batch_size=16",
        "privacy.dp.physical_batch_size=8",
        "privacy.dp.accountant=rdp",
        "federation.rounds=2",
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    banks = [row for row in history.rows if row.phase == "train" and row.bank != FEDERATION]
    assert len(banks) == 6 and all(row.status == "ok" for row in banks), [(r.bank, r.reason) for r in banks]
    assert_finite(tmp_path / "run")


def test_under_he_a_bank_cannot_encrypt_a_non_finite_update_and_the_run_goes_on(tmp_path):
    cfg, spec, grid = hostile_federation(tmp_path, {HOSTILE: "nan"}, "federation.rounds=1", he=True)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    failed = [row for row in history.rows if row.status == "failed"]
    assert len(failed) == 1 and failed[0].phase == "train"
    assert "bank bank_1 round 1: its update cannot be encrypted: the update holds NaN" in failed[0].reason
    assert [row.status for row in train_rows(history, "bank_0") + train_rows(history, "bank_2")] == ["ok", "ok"]
    assert (tmp_path / "run" / "global_state.he").is_file()


class TamperingGrid(InProcessGrid):
    """Delivers round 2's encrypted global with its header weight divided by 10^6 (and a matching
    state hash): what a tampered aggregate decrypts to, a mean a million times too large."""

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        for message in messages:
            config = message.content[protocol.CONFIG]
            if message.metadata.message_type == MessageType.TRAIN and config[protocol.SERVER_ROUND] == 2:
                update = EncryptedUpdate.from_bytes(protocol.record_to_blob(message.content[protocol.ARRAYS]))
                tampered = dataclasses.replace(update, weight=update.weight * 1e-6).to_bytes()
                message.content[protocol.ARRAYS] = protocol.blob_to_record(tampered)
                config[protocol.STATE_HASH] = protocol.record_hash(message.content[protocol.ARRAYS])
        return super().send_and_receive(messages, timeout=timeout)


def test_under_he_every_bank_refuses_a_tampered_aggregate_and_the_round_fails_loudly(tmp_path):
    cfg, spec, grid = hostile_federation(tmp_path, {}, "federation.rounds=2", he=True, grid=TamperingGrid)
    with pytest.raises(FederationRoundError) as error:
        run_federation(grid, cfg, spec, tmp_path / "run")
    message = str(error.value)
    assert "round 2 train: 0 of 3 sampled banks succeeded" in message
    assert message.count("the decrypted global aggregate drifts") == 3, message


def test_fingpt_sim_refuses_an_unknown_behaviour_before_preparing_any_bank(tmp_path):
    with pytest.raises(ValueError, match="simulation.hostile_banks.1: unknown hostile behaviour 'flip'"):
        simulate(config("++simulation.hostile_banks={1: flip}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_fingpt_sim_runs_the_hostile_banks_of_its_config_and_goes_on_with_the_honest_ones(tmp_path):
    cfg = config(
        "federation=iid",
        "federation.num_banks=4",
        "federation.rounds=1",
        "strategy=fedavg",
        "publish.enabled=false",
        '++simulation.hostile_banks={0: nan, 2: "scale:100"}',
    )
    summary = simulate(cfg, tmp_path, echo=False)
    assert summary.final.banks_ok == 2 and summary.final.banks_failed == 2
    failed = {
        row.bank: row.reason
        for row in History.from_json((tmp_path / "metrics.json").read_text()).rows
        if row.status == "failed"
    }
    assert set(failed) == {"bank_00", "bank_02"}
    assert "non-finite values" in failed["bank_00"] and "max_norm_ratio=10" in failed["bank_02"]
    assert "non-finite values" in (tmp_path / "report.md").read_text()
    assert_finite(tmp_path)
