"""fingpt-audit end to end on real tiny federations (Flower simulation engine): slow."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.model.card import audit_lines
from fingpt_federated.server.run_audit import audit_of_run
from fingpt_federated.simulations.audit import AUDIT_JSON, audit


@pytest.fixture
def quick():
    """The quick preset, its federations on one Ray CPU (one ClientApp actor) as in federation_helpers.config:
    two tests already share the 2 cores and each actor pays its imports."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        preset = compose(config_name="audit", overrides=["preset=quick"]).preset
        with open_dict(preset):
            preset.sim = [*preset.sim, "simulation.total_cpus=1"]
        yield preset  # inside: the audit composes its federations' configs in this Hydra context


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_audit_has_power_and_never_certifies_more_than_the_ledger_spent(tiny_setting, quick, tmp_path):
    result = audit(quick, tmp_path)
    saved = json.loads((tmp_path / AUDIT_JSON).read_text(encoding="utf-8"))
    assert saved["membership"] == json.loads(json.dumps(result["membership"]))
    rows = {(row["privacy"], row["model"]): row for row in saved["membership"]}
    # issue 25's power target: canary AUC >= 0.7 without DP, on the published global model (measured 0.78)
    # and on the canary bank's own update, the operator's view of a plaintext run (measured 0.97)
    assert rows[("none", "global")]["mia_auc"] >= 0.7, rows
    assert rows[("none", "bank_update")]["mia_auc"] >= 0.7, rows
    private = [row for row in saved["membership"] if row["privacy"] == "dp"]
    assert private and all(0 < row["epsilon_spent"] <= row["epsilon_target"] + 1e-6 for row in private)
    assert all(row["epsilon_lower"] <= row["epsilon_spent"] for row in private), private
    backdoors = {row["defence"]: row for row in saved["backdoor"]}
    defended = [f"checks+{name}" for name in quick.backdoor_defences]
    floor_name = "none (no backdoor bank)"
    assert set(backdoors) == {"none", "dp_eps8", floor_name, *defended}
    assert all(len(row["rounds"]) >= 1 for row in saved["backdoor"])
    # issue 25's setting: the backdoor bank is 1 of 10 banks in the undefended and defended rows (their own
    # federations), none of 10 in the floor's; the DP row is the 3-bank DP run's
    assert {name: (row["banks"], row["hostile"]) for name, row in backdoors.items()} == {
        "none": (10, 1),
        floor_name: (10, 0),
        "dp_eps8": (3, 1),
        **dict.fromkeys(defended, (10, 1)),
    }
    # the trigger works without a defence (measured 0.92: target rate 0.95 triggered, 0.12 untriggered), far
    # above the floor, what the phrase alone does to the near-chance model that never saw it (measured 0.21
    # of 19 records: why issue 25's <= 10% cannot be told apart from noise here, docs/privacy-utility.md)
    undefended, floor = backdoors["none"], backdoors[floor_name]
    assert undefended["success_rate"] >= 0.8 and undefended["counted"] >= 20, undefended
    # the plain backdoor bank (about a tenth of the rows) passes every check, unbounded, in every round
    assert 0.05 < undefended["hostile_share"] < 0.2, undefended
    fate = [undefended[f"hostile_{how}"] for how in ("accepted", "bounded", "refused")]
    assert fate == [len(undefended["rounds"]), 0, 0], undefended
    assert "hostile_share" not in floor
    assert undefended["triggered_target_rate"] > undefended["untriggered_target_rate"] + 0.3, undefended
    assert floor["counted"] >= 10 and floor["success_rate"] <= undefended["success_rate"] - 0.5, (floor, undefended)
    # issue 25's <= 10% with the defences is NOT met in this near-chance setting (it is in preset=backdoor, 10 IID
    # banks that learn the task, by Multi-Krum and Bulyan: 13 minutes, measured in docs, not run here): checks +
    # FedTrimmedAvg (beta 0.2), the best measured here that keeps clean accuracy, gives 0.34 (clean accuracy 0.43
    # against 0.48 undefended, 0.40 for the floor's model);
    # a broken defence (no lower than the undefended figure) or one that buys its figure with a model worse than
    # the floor's, which never saw an attacker (Krum 0.39, Bulyan 0.36: chance), still fails here
    for name in defended:
        assert backdoors[name]["counted"] >= 20, backdoors[name]
        assert backdoors[name]["success_rate"] <= undefended["success_rate"] - 0.25, (backdoors[name], undefended)
        assert backdoors[name]["clean_accuracy"] >= floor["clean_accuracy"], (backdoors[name], floor)
    views = {(row["view"], row["attack"]): row for row in saved["operator_view"]}
    # issue 25: the label histogram of one plaintext update, recovered nearly (1 - total variation distance;
    # measured 0.93 / 0.97 / 0.93 over 3 seeds; 0.82-0.83 with the sent state's predictions alone)
    histogram = views[("plaintext", "label_histogram")]
    assert histogram["success"] >= 0.9, histogram
    assert sum(histogram["truth"]) == pytest.approx(sum(histogram["estimate"]), abs=1)
    assert 0.0 <= views[("plaintext", "batch_membership_auc")]["success"] <= 1.0
    for name in ("audit.md", "roc.png", "backdoor.png"):
        assert (tmp_path / name).stat().st_size > 0
    card = audit_of_run(tmp_path / "federation_none")  # a model published from an audited run finds it
    assert card is not None and any("canary AUC" in line for line in audit_lines(card))
