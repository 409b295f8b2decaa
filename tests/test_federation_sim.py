"""`fingpt-sim` end to end: the ServerApp and ClientApp on Flower's simulation engine (Ray), via `flwr run`.

The quality test uses MiniLM, not the tiny encoder: a randomly initialised 2-layer encoder gives
features so weak that on label-skewed banks the averaged model stayed at the majority class after
two rounds in most seeds (measured), which would test the model, not the federation. With
pretrained features and 4-token headlines MiniLM costs little more and the test measures what
it should: averaging banks that each miss classes gives a model none of them could train alone.
"""

from __future__ import annotations

import csv
import json
import logging

import pytest
from federation_helpers import config, news_data_overrides, write_news_csv

from fingpt_federated.server.history import History
from fingpt_federated.simulations.baselines import mean_local
from fingpt_federated.simulations.flower_run import SimulationFailed
from fingpt_federated.simulations.sim import simulate, strategy_label

pytestmark = pytest.mark.slow

SKEWED_BANKS = ["federation=dirichlet", "federation.num_banks=3", "federation.alpha=0.3", "seed=2"]


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory):
    return write_news_csv(tmp_path_factory.mktemp("data") / "news.csv", rows=480)


def test_the_report_names_the_strategy_with_its_settings():
    fedavgm = "fedavgm (server_learning_rate=1.0, server_momentum=0.9)"
    assert strategy_label(config("strategy=fedavgm").strategy) == fedavgm
    assert strategy_label(config("strategy=fedprox", "strategy.mu=0.1").strategy) == "fedprox (mu=0.1)"
    assert strategy_label(config("strategy=fedtrimmedavg").strategy) == "fedtrimmedavg (beta=0.2)"
    assert strategy_label(config("strategy=fedavg").strategy) == "fedavg"


def test_federation_beats_its_start_and_every_bank_alone_on_label_skewed_banks(news_csv, tmp_path, caplog):
    cfg = config(
        *news_data_overrides(news_csv),
        *SKEWED_BANKS,
        "federation.rounds=2",
        "model.max_length=16",
        "model.train.lr=2e-3",
        "++baseline=true",
        "simulation.targets=[0.3]",
        model="minilm",
    )
    with caplog.at_level(logging.INFO, logger="fingpt_federated.simulations.baselines"):
        summary = simulate(cfg, tmp_path, echo=False)
    progress = [r.getMessage() for r in caplog.records if r.name == "fingpt_federated.simulations.baselines"]
    assert len(progress) == 2 * 4 and progress[0].startswith("baseline centralized (all banks): ")  # start, end
    assert progress[-1].startswith("baseline local-only (bank_02): test accuracy ")

    local = mean_local(summary.baselines)
    assert [r.round for r in summary.rounds] == [0, 1, 2]
    assert summary.final.test_accuracy >= summary.initial.test_accuracy + 0.3
    assert summary.final.test_accuracy >= local + 0.2, (summary.final.test_accuracy, local)
    assert all(r.banks_ok == 3 and r.banks_failed == 0 for r in summary.rounds[1:])

    for name in (
        "resolved_config.yaml",
        "report.md",
        "global.png",
        "banks.png",
        "metrics.json",
        "baselines.json",
        "summary.json",
        "global_state.safetensors",
    ):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_bank = {(int(r["round"]), r["phase"], r["bank"]) for r in rows if r["bank"].startswith("bank_")}
    phases = ("train", "evaluate")
    assert per_bank == {(n, phase, f"bank_{i:02d}") for n in (1, 2) for phase in phases for i in range(3)}
    report = (tmp_path / "report.md").read_text()
    assert "centralized" in report and "mean local-only" in report
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["final_test_accuracy"] == summary.final.test_accuracy
    reached = written["progress"]["reached"]  # 0.3, then 0.95 and 0.98 of the pooled model's accuracy
    pooled = summary.pooled_accuracy()
    assert [r["accuracy"] for r in reached] == pytest.approx([0.3, 0.95 * pooled, 0.98 * pooled])
    first = next(r for r in summary.rounds[1:] if r.test_accuracy >= 0.3)
    assert reached[0]["round"] == first.round
    assert reached[0]["seconds"] == pytest.approx(sum(r.seconds for r in summary.rounds[1 : first.round + 1]))
    assert "## Progress: rounds and seconds to a target" in report


def test_a_bad_strategy_option_fails_before_any_bank_is_prepared(tmp_path):
    with pytest.raises(ValueError, match="strategy.options.gamma is not an argument of Flower's FedAdam"):
        simulate(config("strategy=fedadam", "++strategy.options.gamma=0.5"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_crashing_bank_is_reported_and_the_run_continues_with_the_others(news_csv, tmp_path):
    cfg = config(
        *news_data_overrides(news_csv),
        *SKEWED_BANKS,
        "federation.rounds=1",
        "federation.min_banks=2",
        "++simulation.fail_banks=[1]",
    )
    summary = simulate(cfg, tmp_path, echo=False)
    assert summary.final.banks_ok == 2 and summary.final.banks_failed == 1
    history = History.from_json((tmp_path / "metrics.json").read_text())
    failed = [r for r in history.rows if r.status == "failed"]
    assert {r.phase for r in failed} == {"train", "evaluate"}
    assert all("bank_01: simulated failure" in r.reason for r in failed)
    assert "simulated failure" in (tmp_path / "report.md").read_text()


def test_too_few_surviving_banks_fail_the_run_loudly_with_their_errors(news_csv, tmp_path):
    cfg = config(
        *news_data_overrides(news_csv),
        *SKEWED_BANKS,
        "federation.rounds=2",
        "federation.min_banks=2",
        "++simulation.fail_banks=[0,2]",
    )
    with pytest.raises(SimulationFailed) as failure:
        simulate(cfg, tmp_path, echo=False)
    message = str(failure.value)
    assert "finished:failed" in message
    assert "1 of 3 sampled banks succeeded, the minimum is 2" in message
    assert "bank_00: simulated failure" in message and "bank_02: simulated failure" in message


def test_fingpt_sim_refuses_server_momentum_under_he_before_preparing_any_bank(tmp_path):
    with pytest.raises(ValueError, match="strategy=fedavgm needs the plaintext global state"):
        simulate(config("privacy=he", "strategy=fedavgm"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
