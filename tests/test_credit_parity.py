"""`+experiment=credit_parity`: the credit preset composes as documented, and runs under DP end to end."""

from __future__ import annotations

import json

import pytest

from fingpt_federated.conf import compose_config
from fingpt_federated.server.history import FEDERATION
from fingpt_federated.simulations.bench_dp import CREDIT_DP


def test_credit_parity_composes_the_features_only_credit_federation_and_its_dp_recipe():
    cfg = compose_config(["+experiment=credit_parity"])
    assert (cfg.data.name, cfg.model.backbone) == ("credit_taiwan_features", "tiny-encoder")
    assert cfg.model.features is not None and cfg.data.text.template is None and cfg.data.series is None
    assert (cfg.federation.partitioner, cfg.federation.key) == ("natural", "EDUCATION")
    assert cfg.strategy.name == "fedavg" and cfg.baseline and cfg.personalize.steps > 0
    # three feature-encoder blocks: 0.7756 ROC AUC over 3 split seeds against one block's 0.7686 (docs/results.md)
    assert cfg.model.feature_encoder.layers == 3 and compose_config([]).model.feature_encoder.layers == 1
    assert not cfg.privacy.dp.enabled
    dp = compose_config(["+experiment=credit_parity", "privacy=dp"])
    assert dp.privacy.dp.enabled and dp.privacy.dp.target_epsilon == 8.0 and dp.privacy.dp.delta == 1e-5
    assert compose_config(["+experiment=credit_parity", "privacy=dp", *CREDIT_DP]) == dp


@pytest.mark.slow
def test_credit_parity_under_dp_runs_on_synthetic_credit_within_budget(tmp_path, tiny_setting):
    """The preset under DP on synthetic credit features (5 banks of 100 rows), one round: every bank trains
    (the feature encoder is stepped under DP), spends at most its epsilon, and the per-bank table is written."""
    from fingpt_federated.simulations.sim import simulate

    cfg = compose_config(
        [
            "+experiment=credit_parity",
            "privacy=dp",
            "data=synthetic_credit_features",
            "federation.key=bank",
            "data.synthetic.rows_per_bank=100",
            "federation.rounds=1",
            "baseline=false",
            "personalize.steps=2",
            "publish.enabled=false",
            "simulation.total_cpus=1",
        ]
    )
    summary = simulate(cfg, tmp_path / "run", echo=False)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]
    trained = [row for row in rows if row["phase"] == "train" and row["status"] == "ok" and row["bank"] != FEDERATION]
    assert sorted(row["bank"] for row in trained) == sorted(summary.banks)
    assert all(0 < row["metrics"]["epsilon"] <= 8.0 for row in trained)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= saved["task_metrics"][-1]["test_roc_auc"] <= 1.0
    assert [row["bank"] for row in saved["per_bank"]["banks"]] == summary.banks
