"""One cached model serves many banks in a simulation actor (client/worker_task.py): each bank's
statistics are fitted on its own rows, not inherited from the bank the actor served first."""

from __future__ import annotations

import torch

from fingpt_federated.client import worker_task
from fingpt_federated.client.app import app as client_app
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.federation_layout import prepare_federation
from fingpt_federated.federation import protocol
from fingpt_federated.model.features import FeatureEncoder
from fingpt_federated.server.app import run_federation
from fingpt_federated.simulations.sim import federation_spec
from tests.federation_helpers import RecordingGrid, config, simulated_nodes


def test_each_bank_trains_with_its_own_feature_statistics_in_a_shared_actor(tmp_path, tiny_setting, monkeypatch):
    cfg = config(
        "data=synthetic_credit_features",
        "federation=natural",
        "federation.key=bank",
        "data.synthetic.rows_per_bank=60",
        "federation.rounds=1",
        "publish.enabled=false",
    )
    layout = prepare_federation(cfg, tmp_path / "federation")
    spec = federation_spec(cfg, layout)
    spec_path = spec.save(tmp_path / "spec.json")
    nodes, run_config = simulated_nodes(spec_path, len(spec.banks))
    fitted = []
    original = FeatureEncoder.fit

    def recording_fit(encoder: FeatureEncoder, numeric, categorical) -> None:  # noqa: ANN001
        original(encoder, numeric, categorical)
        fitted.append(encoder.mean.clone())

    monkeypatch.setattr(FeatureEncoder, "fit", recording_fit)
    grid = RecordingGrid(client_app, nodes, run_config)
    run_federation(grid, cfg, spec, tmp_path / "run")
    assert len(spec.banks) >= 3
    # the model the in-process "actor" holds now was last used for the last message's bank
    last = grid.sent[-1].metadata.dst_node_id
    bank = spec.banks[int(grid.contexts[last].node_config[protocol.NODE_PARTITION_ID])]
    model = worker_task._worker.model
    reference = FeatureEncoder(
        model.features.numeric_names, model.features.categorical_names, 8, 1, model.config.feature_encoder
    )
    features = load_bank(bank.path).train.features
    original(reference, features.numeric, features.categorical)
    assert torch.allclose(model.features.mean, reference.mean), (bank.name, model.features.mean, reference.mean)
    distinct = {tuple(mean.tolist()) for mean in fitted}
    assert len(distinct) >= len(spec.banks)  # every bank's own statistics were fitted, not one bank's for all
