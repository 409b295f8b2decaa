"""The ServerApp's rounds (loud failures, stale replies, stragglers, checkpoints, resume), run in-process.

The real ClientApp answers through `InProcessGrid`, so these tests cover the whole message path
except the transport; tests/test_federation_sim.py runs the same apps on Flower's simulation engine.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (  # noqa: F401
    InProcessGrid,
    RecordingGrid,
    config,
    one_torch_thread,
    simulated_nodes,
    write_federation,
)
from flwr.app import Array, ArrayRecord, MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Krum
from safetensors.numpy import load_file

from fingpt_federated.client.app import app as client_app
from fingpt_federated.client.app import evaluate_global
from fingpt_federated.client.app import train as client_train
from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import Receipt
from fingpt_federated.server import strategy_state
from fingpt_federated.server.app import (
    CHECKPOINTS,
    FINAL_STATE,
    METRICS_CSV,
    run_federation,
)
from fingpt_federated.server.bank_rounds import BankRounds, FederationRoundError
from fingpt_federated.server.banks import Recorded
from fingpt_federated.server.checkpoint import Checkpointer, CheckpointMismatch
from fingpt_federated.server.history import CENTRAL, FEDERATION, History
from fingpt_federated.server.replies import short_reason
from fingpt_federated.server.strategy_config import build_strategy, check_strategy


def federation(tmp_path: Path, *overrides: str, fail=(), work=None, app: ClientApp = client_app, grid=InProcessGrid):
    spec = write_federation(tmp_path / "data", fail=fail, work=work)
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(spec.banks))
    cfg = config("strategy.local_steps=3", *overrides)
    return cfg, spec, grid(app, nodes, run_config)


def train_messages(grid: InProcessGrid) -> list:
    return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]


def test_the_flower_strategy_and_its_options_come_from_the_config_group():
    history = History()
    fedprox = build_strategy(config("strategy=fedprox", "strategy.mu=0.3", "federation.min_banks=3"), history)
    assert isinstance(fedprox, BankRounds) and type(fedprox.strategy) is FedAvg and fedprox.mu == 0.3
    assert fedprox.min_banks == fedprox.strategy.min_train_nodes == fedprox.strategy.min_available_nodes == 3
    fedavgm = build_strategy(config("strategy=fedavgm", "strategy.options.server_momentum=0.5"), history).strategy
    assert isinstance(fedavgm, FedAvgM) and (fedavgm.server_momentum, fedavgm.server_learning_rate) == (0.5, 1.0)
    fedadam = build_strategy(config("strategy=fedadam", "strategy.options.eta=0.05"), history).strategy
    assert isinstance(fedadam, FedAdam) and (fedadam.eta, fedadam.beta_1) == (0.05, 0.9)
    # Any other Flower class is a config away; one that takes proximal_mu gets strategy.mu.
    flower_fedprox = build_strategy(config("strategy.flower=FedProx", "strategy.mu=0.2"), history).strategy
    assert isinstance(flower_fedprox, FedProx) and flower_fedprox.proximal_mu == 0.2
    krum = build_strategy(config("strategy.flower=Krum", "++strategy.options.num_malicious_nodes=1"), history).strategy
    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "++strategy.options.bogus=1",
            r"strategy.options.bogus is not an argument of Flower's FedAdam \(it takes .*eta",
        ),
        ("++strategy.options.min_train_nodes=1", "strategy.options.min_train_nodes: set by the federation group"),
        ("++strategy.options.proximal_mu=0.1", "strategy.options.proximal_mu: set strategy.mu"),
        ("strategy.flower=FedMagic", r"strategy.flower must name a strategy .*FedAdam.*got 'FedMagic'"),
        ("strategy.flower=Strategy", "got 'Strategy'"),
    ],
)
def test_a_bad_strategy_config_is_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        check_strategy(config("strategy=fedadam", override), encrypted=False)


def test_rounds_write_metrics_and_checkpoints_and_a_restart_resumes(tmp_path):
    cfg, spec, grid = federation(tmp_path, "strategy=fedprox", "federation.rounds=1")
    run_dir = tmp_path / "run"
    history = run_federation(grid, cfg, spec, run_dir)
    assert {(r.round, r.phase) for r in history.rows if r.bank == FEDERATION} == {(1, "train"), (1, "evaluate")}
    assert len(history.select("train")) == 3 + 1 and len(history.select(CENTRAL)) == 2
    assert all(m.content[protocol.CONFIG][protocol.PROXIMAL_MU] == cfg.strategy.mu for m in train_messages(grid))
    first = load_file(str(run_dir / CHECKPOINTS / "round_0001" / "state.safetensors"))

    cfg, spec, grid = federation(tmp_path, "strategy=fedprox", "federation.rounds=3")
    history = run_federation(grid, cfg, spec, run_dir)
    rounds_sent = {m.content[protocol.CONFIG][protocol.SERVER_ROUND] for m in grid.sent}
    assert rounds_sent == {2, 3}
    resumed_from = protocol.record_to_state(train_messages(grid)[0].content[protocol.ARRAYS])
    assert all((resumed_from[name].numpy() == first[name]).all() for name in first)
    assert sorted({r.round for r in history.rows}) == [0, 1, 2, 3]
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == ["round_0002", "round_0003"]
    final = load_file(str(run_dir / FINAL_STATE))
    last = load_file(str(run_dir / CHECKPOINTS / "round_0003" / "state.safetensors"))
    assert all((final[name] == last[name]).all() for name in last)
    assert "bank_2" in (run_dir / METRICS_CSV).read_text()


def test_a_failing_bank_is_logged_and_the_round_goes_on_while_enough_banks_remain(tmp_path):
    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "federation.min_banks=2", fail=[1])
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    failed = [r for r in history.rows if r.status == "failed"]
    assert {(r.round, r.phase) for r in failed} == {(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")}
    assert all("bank_1: simulated failure" in r.reason for r in failed)
    assert {r.bank for r in history.select("train") if r.bank != FEDERATION} == {"bank_0", "bank_2"}


@pytest.mark.parametrize("strategy", ["fedprox", "fedtrimmedavg"])
def test_fewer_banks_than_the_minimum_fail_the_run_with_every_reason(tmp_path, strategy):
    cfg, spec, grid = federation(
        tmp_path, f"strategy={strategy}", "federation.rounds=2", "federation.min_banks=2", fail=[0, 2]
    )
    with pytest.raises(FederationRoundError) as error:
        run_federation(grid, cfg, spec, tmp_path / "run")
    message = str(error.value)
    assert "round 1 train: 1 of 3 sampled banks succeeded, the minimum is 2" in message
    assert "bank_0: simulated failure" in message and "bank_2: simulated failure" in message


def test_a_reply_to_another_round_or_state_is_rejected_before_aggregation(tmp_path):
    stale = ClientApp()

    @stale.train()
    def _(msg, context):
        reply = client_train(msg, context)
        reply.content[protocol.RECEIPT] = Receipt("replayed bank", 7, "0" * 64).to_config()
        return reply

    cfg, spec, grid = federation(tmp_path, "federation.rounds=1", "federation.min_banks=1", app=stale)
    with pytest.raises(FederationRoundError, match="stale reply: it answers round 7"):
        run_federation(grid, cfg, spec, tmp_path / "run")


def test_a_bank_that_never_answers_counts_as_failed(tmp_path):
    cfg, spec, grid = federation(tmp_path, "federation.rounds=1", "federation.min_banks=3")
    deliver = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: [r for r in deliver(messages) if r.metadata.src_node_id != 2]
    with pytest.raises(FederationRoundError, match="node 2: no reply within the round timeout"):
        run_federation(grid, cfg, spec, tmp_path / "run")


def test_the_order_replies_arrive_in_does_not_change_the_aggregate(tmp_path):
    """Banks answer in any order on a real SuperLink; the server averages them in bank order, so a run
    is reproducible to the last bit (float sums in another order differ in the last digits)."""
    finals = []
    for reverse in (False, True):
        cfg, spec, grid = federation(tmp_path / str(reverse), "strategy=fedavg", "federation.rounds=1")
        if reverse:
            grid.send_and_receive = lambda messages, timeout=None, deliver=grid.send_and_receive: list(
                deliver(messages)
            )[::-1]
        run_federation(grid, cfg, spec, tmp_path / str(reverse) / "run")
        finals.append(load_file(str(tmp_path / str(reverse) / "run" / FINAL_STATE)))
    assert finals[0].keys() == finals[1].keys()
    assert all(np.array_equal(finals[0][name], finals[1][name]) for name in finals[0])


def test_fedavg_can_drop_stragglers_as_in_the_fedprox_paper(tmp_path):
    cfg, spec, grid = federation(
        tmp_path, "strategy=fedavg", "strategy.drop_stragglers=true", "federation.rounds=1", work={0: 0.3}
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    dropped = [r for r in history.rows if r.status == "dropped"]
    assert [(r.bank, r.metrics["local_steps"], r.metrics["planned_steps"]) for r in dropped] == [("bank_0", 1.0, 3.0)]


def _weighted_mean(replies: list) -> dict[str, np.ndarray]:
    states = [protocol.record_to_state(r.content[protocol.ARRAYS]) for r in replies]
    weights = [float(r.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]) for r in replies]
    return {
        name: sum(w * s[name].double().numpy() for w, s in zip(weights, states, strict=True)) / sum(weights)
        for name in states[0]
    }


def _sent_state(before: InProcessGrid, after: InProcessGrid, index: int) -> dict[str, np.ndarray]:
    """The global state of the index-th train message sent, over a run and its resumption."""
    message = [*train_messages(before), *train_messages(after)][index]
    return {name: t.double().numpy() for name, t in protocol.record_to_state(message.content[protocol.ARRAYS]).items()}


def test_fedavgm_steps_the_global_state_along_the_banks_mean_update_with_momentum(tmp_path):
    cfg, spec, grid = federation(
        tmp_path,
        "strategy=fedavgm",
        "strategy.options.server_learning_rate=0.8",
        "strategy.options.server_momentum=0.5",
        "federation.rounds=2",
        grid=RecordingGrid,
    )
    run_federation(grid, cfg, spec, tmp_path / "run")
    sent = [protocol.record_to_state(m.content[protocol.ARRAYS]) for m in train_messages(grid)]
    w0, w1 = ({n: t.double().numpy() for n, t in sent[i].items()} for i in (0, 3))
    trained = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    mean1, mean2 = _weighted_mean(trained[:3]), _weighted_mean(trained[3:])
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    for name in w0:
        step1 = w0[name] - mean1[name]
        np.testing.assert_allclose(w1[name], w0[name] - 0.8 * step1, atol=1e-6)
        np.testing.assert_allclose(final[name], w1[name] - 0.8 * (0.5 * step1 + w1[name] - mean2[name]), atol=1e-6)
    assert any(np.abs(final[n] - mean2[n]).max() > 1e-4 for n in final)  # not plain FedAvg


def test_fedavgm_momentum_is_checkpointed_and_a_resumed_run_goes_on_with_it(tmp_path):
    fedavgm = ("strategy=fedavgm", "strategy.options.server_momentum=0.5")
    cfg, spec, before = federation(tmp_path, *fedavgm, "federation.rounds=2", grid=RecordingGrid)
    run_federation(before, cfg, spec, tmp_path / "run")
    cfg, spec, after = federation(tmp_path, *fedavgm, "federation.rounds=3", grid=RecordingGrid)
    run_federation(after, cfg, spec, tmp_path / "run")
    w0, w1, w2 = (_sent_state(before, after, i) for i in (0, 3, 6))
    trained = [r for r in [*before.replies, *after.replies] if r.metadata.message_type == MessageType.TRAIN]
    mean1, mean2, mean3 = (_weighted_mean(trained[i : i + 3]) for i in (0, 3, 6))
    momentum = load_file(str(tmp_path / "run" / CHECKPOINTS / "round_0002" / "server_state.safetensors"))
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    for i, name in enumerate(w0):  # Flower keeps the momentum as a list in the order of the state's arrays
        v2 = 0.5 * (w0[name] - mean1[name]) + w1[name] - mean2[name]
        np.testing.assert_allclose(momentum[f"momentum_vector:list:{i}"], v2, atol=1e-6)
        np.testing.assert_allclose(final[name], w2[name] - (0.5 * v2 + w2[name] - mean3[name]), atol=1e-6)


def test_fedadam_moments_are_checkpointed_and_a_resumed_run_goes_on_with_them(tmp_path):
    fedadam = ("strategy=fedadam", "strategy.options.eta=0.01")
    cfg, spec, before = federation(tmp_path, *fedadam, "federation.rounds=2", grid=RecordingGrid)
    run_federation(before, cfg, spec, tmp_path / "run")
    cfg, spec, after = federation(tmp_path, *fedadam, "federation.rounds=3", grid=RecordingGrid)
    run_federation(after, cfg, spec, tmp_path / "run")
    eta, beta_1, beta_2, tau = (float(cfg.strategy.options[key]) for key in ("eta", "beta_1", "beta_2", "tau"))
    w0, w1, w2 = (_sent_state(before, after, i) for i in (0, 3, 6))
    trained = [r for r in [*before.replies, *after.replies] if r.metadata.message_type == MessageType.TRAIN]
    mean1, mean2, mean3 = (_weighted_mean(trained[i : i + 3]) for i in (0, 3, 6))
    saved = load_file(str(tmp_path / "run" / CHECKPOINTS / "round_0002" / "server_state.safetensors"))
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    for name in w0:
        d1, d2, d3 = mean1[name] - w0[name], mean2[name] - w1[name], mean3[name] - w2[name]
        m2 = beta_1 * (1 - beta_1) * d1 + (1 - beta_1) * d2
        v2 = beta_2 * (1 - beta_2) * d1**2 + (1 - beta_2) * d2**2
        np.testing.assert_allclose(saved[f"m_t:dict:{name}"], m2, rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(saved[f"v_t:dict:{name}"], v2, rtol=1e-4, atol=1e-12)
        m3, v3 = beta_1 * m2 + (1 - beta_1) * d3, beta_2 * v2 + (1 - beta_2) * d3**2
        step = eta * np.sqrt(1 - beta_2**4) / (1 - beta_1**4)  # Flower's bias correction at (global) round 3
        np.testing.assert_allclose(final[name], w2[name] + step * m3 / (np.sqrt(v3) + tau), rtol=1e-4, atol=1e-6)
    assert "current_arrays" not in " ".join(saved)  # the checkpoint's state already is the global state
    assert {array.dtype.name for array in final.values()} == {"float32"}  # not FedAdam's float64 step


class CopyingGrid(InProcessGrid):
    """Keeps a copy of each train reply's content: FedTrimmedAvg empties the replies it aggregates."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.trained = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = list(super().send_and_receive(messages, timeout=timeout))
        train = [r for r in replies if r.metadata.message_type == MessageType.TRAIN and r.has_content()]
        self.trained += [copy.deepcopy(r.content) for r in train]
        return replies


def test_fedtrimmedavg_cuts_a_bank_at_each_end_and_upload_bytes_count_every_accepted_reply(tmp_path):
    """Flower's FedTrimmedAvg by config alone; it takes the arrays out of the replies it aggregates, so the
    round's upload bytes must be counted before it runs."""
    overrides = ("strategy=fedtrimmedavg", "strategy.options.beta=0.34", "federation.rounds=1")
    cfg, spec, grid = federation(tmp_path, *overrides, grid=CopyingGrid)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    states = [protocol.record_to_state(content[protocol.ARRAYS]) for content in grid.trained]
    final = load_file(str(tmp_path / "run" / FINAL_STATE))
    assert len(states) == 3
    for name in final:  # 3 values with one cut at each end leave their median
        median = np.median(np.stack([s[name].double().numpy() for s in states]), axis=0)
        np.testing.assert_allclose(final[name], median, rtol=1e-5, atol=1e-6)
    state_bytes = sum(array.nbytes for array in final.values())
    [upload] = [r.metrics["upload_bytes"] for r in history.select("train", FEDERATION)]
    assert upload >= 3 * state_bytes


def test_server_state_of_one_strategy_is_refused_by_another():
    adam = FedAdam()
    adam.m_t, adam.v_t = {"w": np.ones(2, dtype=np.float32)}, {"w": np.full(2, 4.0, dtype=np.float32)}
    state = strategy_state.capture(BankRounds(adam, min_banks=1, history=History()).strategy)
    restored = FedAdam()
    strategy_state.restore(restored, state)
    assert (restored.m_t["w"] == 1).all() and (restored.v_t["w"] == 4).all()
    with pytest.raises(ValueError, match="server state 'm_t', which FedAvgM does not keep"):
        strategy_state.restore(FedAvgM(), state)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    cfg, spec, grid = federation(tmp_path, "federation.rounds=1")
    run_federation(grid, cfg, spec, tmp_path / "run")
    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "model.lora.r=4")
    with pytest.raises(CheckpointMismatch, match="schema"):
        run_federation(grid, cfg, spec, tmp_path / "run")


def test_an_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path):
    checkpointer = Checkpointer(tmp_path, schema="s", keep=2)
    history = History()
    history.add(1, "central", CENTRAL, {"accuracy": 0.5, "roc_auc": float("nan")})
    checkpointer.save(1, ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}), history)
    (tmp_path / ".round_0002.partial").mkdir()
    latest = checkpointer.latest()
    assert latest.server_round == 1 and latest.history.rows[0].metrics["accuracy"] == 0.5
    assert np.isnan(latest.history.rows[0].metrics["roc_auc"])
    assert (latest.arrays["w"].numpy() == 1).all()


def test_a_bank_error_is_reported_by_its_message_not_by_flowers_wrapping():
    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m\n"
        "  File ...\nTraceback ...\nException ClientAppException occurred. Message: bank b: disk full'>"
    )
    assert short_reason(ray) == "bank b: disk full"
    data_error = "<class 'fingpt_federated.data.errors.DataError'>:<'bank.csv, row 3: bad label'>"
    assert short_reason(data_error) == "DataError: bank.csv, row 3: bad label"
    assert short_reason("no reply") == "no reply"


NAMES = ["bank_0", "bank_1", "bank_2"]  # write_federation's banks, on nodes 1..3


def registered(workdir: Path, nodes: dict[int, str]) -> Path:
    """An operator's banks folder whose registry.json records `nodes` (node id -> registered name)."""
    (workdir / "banks").mkdir(parents=True)
    write_registry(workdir / "banks", nodes)
    return workdir / "banks"


def write_registry(folder: Path, nodes: dict[int, str]) -> None:
    """registry.json in `folder`, as fingpt-server register-bank writes it: `nodes` (node id -> name)."""
    banks = {name: {"fingerprint": f"SHA256:key-of-{name}", "node_id": node} for node, name in nodes.items()}
    (folder / "registry.json").write_bytes(Recorded(banks).to_json())


def test_in_a_deployment_a_node_answers_only_for_the_bank_its_key_was_registered_as(tmp_path):
    """The banks' data names are bank_0..bank_2 on nodes 1..3; the operator registered nodes 1 and 2 the other
    way round and never registered node 3: only what the registry says is believed, nothing is aggregated."""
    folder = registered(tmp_path / "operator", {1: "bank_1", 2: "bank_0"})
    cfg, spec, grid = federation(
        tmp_path, "federation.rounds=1", "federation.min_banks=1", f"federation.bank_registry={folder}"
    )
    with pytest.raises(FederationRoundError) as error:
        run_federation(grid, cfg, spec, tmp_path / "run")
    message = str(error.value)
    assert "round 1 train: 0 of 3 sampled banks succeeded" in message
    assert "node 1 is registered as bank bank_1, its reply names bank_0" in message
    assert "node 2 is registered as bank bank_0, its reply names bank_1" in message
    assert "node 3 is not in the operator's bank registry" in message


def test_registered_names_that_match_the_banks_data_run_as_before(tmp_path):
    folder = registered(tmp_path / "operator", {1: "bank_0", 2: "bank_1", 3: "bank_2"})
    cfg, spec, grid = federation(
        tmp_path, "federation.rounds=1", "federation.min_banks=3", f"federation.bank_registry={folder}"
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    rows = [r for r in history.select("train") if r.bank != FEDERATION]
    assert {(r.node_id, r.bank) for r in rows} == {(1, "bank_0"), (2, "bank_1"), (3, "bank_2")}


def test_a_bank_accepted_during_the_run_is_read_from_the_registry_when_it_first_answers(tmp_path):
    """fingpt-server register-bank applies at once to a running SuperLink and records the new node in
    registry.json: the run takes the bank in (here bank_2 is registered just before its node trains)."""
    folder = registered(tmp_path / "operator", {1: "bank_0", 2: "bank_1"})
    joining = ClientApp()

    @joining.train()
    def _(msg, context):
        if context.node_id == 3:
            write_registry(folder, dict(enumerate(NAMES, 1)))
        return client_train(msg, context)

    joining.evaluate()(evaluate_global)
    cfg, spec, grid = federation(
        tmp_path,
        "federation.rounds=1",
        "federation.min_banks=3",
        f"federation.bank_registry={folder}",
        app=joining,
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    assert {r.bank for r in history.select("train") if r.bank != FEDERATION} == set(NAMES)


def test_a_bank_registry_setting_without_a_registry_stops_the_run_before_any_round(tmp_path):
    (tmp_path / "operator" / "banks").mkdir(parents=True)
    cfg, spec, grid = federation(
        tmp_path, "federation.rounds=1", f"federation.bank_registry={tmp_path / 'operator' / 'banks'}"
    )
    with pytest.raises(ValueError, match="is not an operator's banks folder with a registry.json"):
        run_federation(grid, cfg, spec, tmp_path / "run")
    assert not grid.sent
