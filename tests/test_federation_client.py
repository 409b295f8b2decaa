"""The bank's ClientApp, called in-process with the messages the ServerApp would send."""

from __future__ import annotations

import numpy as np
import pytest
from federation_helpers import (  # noqa: F401
    CLASSES,
    client_message,
    config,
    node_context,
    one_torch_thread,
    state_distance,
    tiny_model,
    trained,
    write_bank,
)
from flwr.app import MessageType

from fingpt_federated.client.app import app as client_app
from fingpt_federated.data.federation_layout import FederationLayout
from fingpt_federated.federation import protocol
from fingpt_federated.federation.federation_spec import BankSite, FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state
from fingpt_federated.simulations.sim import federation_spec


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return write_bank(tmp_path_factory.mktemp("bank") / "bank_a", "bank_a", [0.6, 0.2, 0.2], seed=1)


@pytest.fixture(scope="module")
def model_config():
    return tiny_model()


@pytest.fixture(scope="module")
def initial(model_config):
    model, _ = build_model(model_config, len(CLASSES), 0)
    return federated_state(model)


def test_train_reply_carries_state_metrics_and_receipt(bank, initial):
    reply = client_app(client_message(initial), node_context({protocol.NODE_DATA_PATH: str(bank)}))
    state, metrics = trained(reply)
    assert list(state) == list(initial)
    assert state_distance(state, initial) > 0
    assert metrics[protocol.NUM_EXAMPLES] == 48
    expected = {protocol.NUM_EXAMPLES, "train_loss", "local_steps", "planned_steps", "straggler", "seconds"}
    assert set(metrics) == expected | {"backbone_loads"}
    assert metrics["local_steps"] == 6 and metrics["straggler"] == 0.0
    receipt = protocol.Receipt.from_config(reply.content[protocol.RECEIPT])
    assert receipt.server_round == 1 and receipt.bank == "bank_a"


def test_fedprox_mu_changes_the_update_and_a_huge_mu_pins_it_to_the_global_state(bank, initial):
    node = node_context({protocol.NODE_DATA_PATH: str(bank)})
    free, _ = trained(client_app(client_message(initial, mu=0.0, local_steps=12), node))
    proximal, _ = trained(client_app(client_message(initial, mu=0.5, local_steps=12), node))
    pinned, _ = trained(client_app(client_message(initial, mu=1e6, local_steps=12), node))
    assert state_distance(proximal, free) > 1e-3
    assert state_distance(proximal, initial) < state_distance(free, initial)
    # AdamW moves every coordinate by about lr per step whatever the gradient, so even a huge mu
    # leaves a drift of the order of lr; without the proximal term the drift grows with every step
    # (measured: 0.02 against 1.1).
    assert state_distance(pinned, initial) < 0.05 * state_distance(free, initial)


def test_a_straggler_does_its_share_of_the_local_steps(bank, initial):
    node = node_context({protocol.NODE_DATA_PATH: str(bank), protocol.NODE_LOCAL_WORK: 0.5})
    reply = client_app(client_message(initial, local_steps=6), node)
    _, metrics = trained(reply)
    assert metrics["local_steps"] == 3 and metrics["planned_steps"] == 6 and metrics["straggler"] == 1.0


def test_simulated_bank_found_by_partition_id_and_failure_injection(bank, initial, tmp_path):
    banks = [BankSite(str(bank), "ok bank"), BankSite(str(bank), "broken bank", fail=True)]
    spec = FederationSpec(list(CLASSES), 0, None, banks)
    run_config = {protocol.RUN_SPEC_PATH: str(spec.save(tmp_path / "spec.json"))}
    reply = client_app(client_message(initial), node_context({protocol.NODE_PARTITION_ID: 0}, run_config))
    assert protocol.Receipt.from_config(reply.content[protocol.RECEIPT]).bank == "ok bank"
    with pytest.raises(Exception, match="broken bank: simulated failure"):
        client_app(client_message(initial), node_context({protocol.NODE_PARTITION_ID: 1}, run_config))


def test_evaluate_scores_the_global_model_on_the_bank_validation_split(bank, initial):
    node = node_context({protocol.NODE_DATA_PATH: str(bank)})
    reply = client_app(client_message(initial, MessageType.EVALUATE), node)
    metrics = reply.content[protocol.METRICS]
    assert metrics[protocol.NUM_EXAMPLES] == 16
    assert {"loss", "accuracy", "macro_f1"} <= set(metrics)


def test_a_state_that_does_not_match_its_announced_hash_is_refused(bank, initial):
    with pytest.raises(Exception, match="differs from the announced"):
        client_app(client_message(initial, state_hash="0" * 64), node_context({protocol.NODE_DATA_PATH: str(bank)}))


def test_a_node_without_data_path_or_spec_says_how_to_configure_it(initial):
    with pytest.raises(Exception, match="data-path"):
        client_app(client_message(initial), node_context({}))


def test_the_simulation_spec_marks_a_seeded_share_of_banks_as_stragglers(tmp_path):
    layout = FederationLayout(
        [tmp_path / f"b{i}" for i in range(4)],
        [f"bank_{i}" for i in range(4)],
        tmp_path / "test",
        list(CLASSES),
        0,
        np.zeros((4, 3)),
        np.zeros((4, 3)),
    )
    cfg = config("++simulation.stragglers=0.5", "++simulation.straggler_work=0.25", "++simulation.fail_banks=[3]")
    spec = federation_spec(cfg, layout)
    assert sorted(bank.work for bank in spec.banks) == [0.25, 0.25, 1.0, 1.0]
    assert [bank.fail for bank in spec.banks] == [False, False, False, True]
    assert federation_spec(cfg, layout) == spec
    with pytest.raises(ValueError, match=r"simulation\.stragglerz: Key 'stragglerz' not in 'SimulationConfig'"):
        config("++simulation.stragglerz=0.5")  # refused when composed, before any bank is prepared
