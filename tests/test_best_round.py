"""Publishing the best round: chosen by the monitored validation metric, never pruned, right after a resume,
recorded in the model card, and refused (with the way out) for a handed-over state that is the last round."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from federation_helpers import (  # noqa: F401
    InProcessGrid,
    config,
    one_torch_thread,
    simulated_nodes,
    write_federation,
)
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file

from fingpt_federated.client.app import app as client_app
from fingpt_federated.conf import save_resolved_config
from fingpt_federated.conf.schema import check_config
from fingpt_federated.infer.cli import main as infer_main
from fingpt_federated.model.card import CARD_JSON, CARD_MD
from fingpt_federated.server.app import CHECKPOINTS, FINAL_STATE, run_federation
from fingpt_federated.server.best_round import RoundSelection
from fingpt_federated.server.checkpoint import STATE_FILE, Checkpointer
from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.server.publish import MODEL_DIR, publish_after_run, publish_run
from fingpt_federated.server.run_folder import FEDERATION_SPEC, METRICS_JSON


def history_of(losses: list[float], f1s: list[float] | None = None) -> History:
    """Rounds 1..n with the federation's validation loss (and macro-F1), a central row for round 0."""
    history = History()
    history.add(0, "central", "central", {"loss": 1.1})
    for i, loss in enumerate(losses, start=1):
        metrics = {"loss": loss} | ({"macro_f1": f1s[i - 1]} if f1s else {})
        history.add(i, "evaluate", FEDERATION, metrics)
    return history


def test_best_is_chosen_by_the_monitor_and_its_direction_ties_to_the_earlier_round():
    history = history_of([0.9, 0.5, 0.5, 0.7], [0.2, 0.6, 0.8, 0.8])
    by_loss = RoundSelection("best", "loss", "min").choose(history)
    assert (by_loss.round, by_loss.value, by_loss.last_round, by_loss.last_value) == (2, 0.5, 4, 0.7)
    assert RoundSelection("best", "macro_f1", "max").choose(history).round == 3
    assert RoundSelection("last", "loss", "min").choose(history).round == 4
    assert "round 2 of 4 (publish.select=best, validation loss 0.5000, min is best; last round 0.7000)" in (
        by_loss.line()
    )


def test_no_validation_metric_publishes_the_last_round_and_says_why():
    history = history_of([0.9, 0.5])
    choice = RoundSelection("best", "roc_auc", "max").choose(history)
    assert choice.round == 2 and math.isnan(choice.value) and "no round has a validation roc_auc" in choice.note


def test_the_monitor_defaults_to_the_training_monitor_and_bad_settings_fail_the_config():
    selection = RoundSelection.from_config(config("model.train.monitor=macro_f1"))
    assert (selection.select, selection.monitor, selection.mode) == ("best", "macro_f1", "max")
    assert RoundSelection.from_config(config("publish.monitor=loss", "publish.mode=max")).mode == "max"
    for bad, message in (("publish.select=first", "publish.select"), ("publish.monitor=f1", "publish.monitor")):
        with pytest.raises(ValueError, match=message):
            check_config(config(bad))


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})


def test_pruning_keeps_the_best_round_of_every_kept_checkpoint(tmp_path):
    """keep=2: each save keeps the newest two rounds and the best so far. Round 2 is best until round 5 beats it; the
    best of round 4's history (2) must survive while round 4 is kept, so a resume from 4 finds it."""
    losses = [0.9, 0.4, 0.6, 0.7, 0.3, 0.5]
    history = history_of(losses)
    selection = RoundSelection("best", "loss", "min")
    checkpointer = Checkpointer(tmp_path, None, keep=2, pin=selection.pinned)
    on_disk = []
    for number in range(1, len(losses) + 1):
        checkpointer.save(number, arrays(number), history)
        on_disk.append(sorted(int(p.name[-4:]) for p in tmp_path.glob("round_*")))
    assert on_disk == [[1], [1, 2], [2, 3], [2, 3, 4], [2, 4, 5], [5, 6]]
    last = Checkpointer(tmp_path, None, keep=1, pin=RoundSelection("last", "loss", "min").pinned)
    last.save(7, arrays(7), history)
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_0007"]


def test_a_resume_recomputes_the_best_round_from_the_checkpoint_it_continues(tmp_path):
    history = history_of([0.9, 0.4, 0.6, 0.3])
    selection = RoundSelection("best", "loss", "min")
    checkpointer = Checkpointer(tmp_path, None, keep=2, pin=selection.pinned)
    for number in range(1, 5):
        checkpointer.save(number, arrays(number), history)
    resumed = Checkpointer(tmp_path, None, keep=2, pin=selection.pinned).resume(3)
    assert resumed is not None and resumed.server_round == 3
    assert selection.choose(resumed.history).round == 2  # round 4's 0.3 went aside with round 4
    assert (tmp_path / "round_0002" / STATE_FILE).is_file()


@pytest.fixture(scope="module")
def three_rounds(tmp_path_factory):
    """A real run of three rounds (three in-process banks), every checkpoint kept, published by the ServerApp."""
    root = tmp_path_factory.mktemp("three-rounds")
    spec = write_federation(root / "data")
    nodes, run_config = simulated_nodes(root / "data" / "spec.json", len(spec.banks))
    cfg = config(
        "strategy.local_steps=2",
        "federation.rounds=3",
        "federation.checkpoints_kept=1",
        "publish.variants=[fp32]",
        "publish.monitor=macro_f1",
    )
    run_dir = root / "run"
    history = run_federation(InProcessGrid(client_app, nodes, run_config), cfg, spec, run_dir)
    save_resolved_config(cfg, run_dir)
    spec.save(run_dir / FEDERATION_SPEC)
    return run_dir, history


def test_a_run_publishes_its_best_round_and_the_card_says_which(three_rounds):
    run_dir, history = three_rounds
    f1 = history.validation("macro_f1")
    assert sorted(f1) == [1, 2, 3] and all(0 <= v <= 1 for v in f1.values())
    best = min(f1, key=lambda r: (-f1[r], r))
    kept = sorted(int(p.name[-4:]) for p in (run_dir / CHECKPOINTS).glob("round_*"))
    assert kept == sorted({best, 3})  # checkpoints_kept=1 pruned all but the last and the best
    card = json.loads((run_dir / MODEL_DIR / CARD_JSON).read_text())
    selection = card["selection"]
    assert selection["round"] == best and selection["monitor"] == "validation macro_f1" and selection["mode"] == "max"
    assert selection["value"] == pytest.approx(f1[best]) and selection["last_value"] == pytest.approx(f1[3])
    assert card["selected_metrics"]["banks_validation"]["macro_f1"] == pytest.approx(f1[best])
    assert "## Published round" in (run_dir / MODEL_DIR / CARD_MD).read_text()


def test_publish_run_loads_the_chosen_rounds_checkpoint(three_rounds, tmp_path):
    """The history is rewritten so that round 1 is best: round 1's checkpoint is what is published (an
    altered byte in it stops publishing, naming it), and `select=last` publishes the final state."""
    source, _ = three_rounds
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    history = History.from_json((run_dir / METRICS_JSON).read_text())
    for row in history.select("evaluate", FEDERATION):
        row.metrics["macro_f1"] = 0.9 if row.round == 1 else 0.1
    (run_dir / METRICS_JSON).write_text(history.to_json())
    shutil.rmtree(run_dir / CHECKPOINTS / "round_0001", ignore_errors=True)
    final = load_file(str(run_dir / FINAL_STATE))
    round_one = ArrayRecord({name: Array(value) for name, value in final.items()})
    Checkpointer(run_dir / CHECKPOINTS, None, keep=5).save(1, round_one, history)
    _, card = publish_run(run_dir, variants=["fp32"], out=tmp_path / "m")
    assert card["selection"]["round"] == 1 and "checkpoint of round 1" in card["state_source"]
    _, last = publish_run(run_dir, variants=["fp32"], out=tmp_path / "m2", select="last")
    assert last["selection"]["round"] == 3 and "final global state" in last["state_source"]
    state = run_dir / CHECKPOINTS / "round_0001" / STATE_FILE
    state.write_bytes(state.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError, match="cannot publish round 1 of 3 .*round_0001/state.safetensors: sha256 differs"):
        publish_run(run_dir, variants=["fp32"], out=tmp_path / "m3")


def test_a_handed_over_state_is_refused_when_best_is_not_the_last_round(three_rounds, tmp_path, capsys):
    source, _ = three_rounds
    run_dir = Path(shutil.copytree(source, tmp_path / "run"))
    history = History.from_json((run_dir / METRICS_JSON).read_text())
    for row in history.select("evaluate", FEDERATION):
        row.metrics["macro_f1"] = 0.9 if row.round == 2 else 0.1
    (run_dir / METRICS_JSON).write_text(history.to_json())
    handed = shutil.copy(run_dir / FINAL_STATE, tmp_path / "decrypted.safetensors")
    command = ["publish", str(run_dir), "--state", str(handed), "--out", str(tmp_path / "m"), "--variants", "fp32"]
    assert infer_main(command) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("fingpt-infer: error: publish.select=best chooses round 2 of 3") and "\n" not in error
    assert "--select last" in error and not (tmp_path / "m").exists()
    assert infer_main([*command, "--select", "last"]) == 0
    assert json.loads((tmp_path / "m" / CARD_JSON).read_text())["selection"]["round"] == 3


def test_under_he_the_end_of_run_line_says_the_best_round_is_not_what_a_bank_decrypts(tmp_path):
    history = history_of([0.5, 0.9])
    line = publish_after_run(config("privacy=he"), None, history, tmp_path, tmp_path / "global_state.he")
    assert "fingpt-client he-decrypt" in line and "chooses round 1 of 2" in line and "--select last" in line
    plain = publish_after_run(config("privacy=he", "publish.select=last"), None, history, tmp_path, tmp_path)
    assert "chooses" not in plain
