"""Personalization (client/personalization.py) and the per-bank comparison (simulations/personalization.py).

Fast: the tiny encoder on keyword headlines, a few optimizer steps. The whole fingpt-sim path with
quick_parity is the slow test at the end.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from fingpt_federated.client.personalization import fit_label_prior, local_part, personalize
from fingpt_federated.client.training import train_local
from fingpt_federated.conf import compose_config
from fingpt_federated.conf.schema import PersonalizeConfig
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.federation_layout import prepare_federation
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate, logits_of
from fingpt_federated.model.state import federated_state, trainable_parameters
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.simulations.personalization import BankComparison, markdown_section, verdict_lines, verdicts
from fingpt_federated.simulations.prior_shift import main as prior_shift_main
from fingpt_federated.simulations.repersonalize import main as repersonalize_main
from tests.federation_helpers import CLASSES, config, news, news_data_overrides, tiny_model, write_news_csv

TRAIN = TrainConfig(lr=3e-3, batch_size=16, epochs=1, progress=False, patience=None)


@pytest.fixture
def model(tiny_setting):
    built, tokenizer = build_model(tiny_model(), len(CLASSES), 0)
    return built, tokenizer


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_local_part_is_the_head_or_the_head_and_the_lora_adapters(model):
    built, _ = model
    head = local_part(built, "head")
    both = local_part(built, "head+lora")
    assert head and all(name.startswith("head.") for name in head)
    assert set(head) < set(both)
    assert all(name.startswith("head.") or "lora_" in name for name in both)
    assert set(trainable_parameters(built)) - set(head), "the head leaves the LoRA adapters global"
    with pytest.raises(ValueError, match="personalized part"):
        local_part(built, "fusion")


@pytest.mark.parametrize("part", ["head", "head+lora"])
def test_personalizing_moves_only_the_local_part_and_leaves_the_rest_trainable(model, part):
    built, tokenizer = model
    start = federated_state(built)
    names = set(trainable_parameters(built))
    result = personalize(built, tokenizer, news(48, [0.8, 0.1, 0.1], seed=1), None, TRAIN, part=part, steps=6)
    after = federated_state(built)
    assert result.kept and result.steps == 6
    changed = _changed(start, after)
    assert changed == set(local_part(built, part))  # every local tensor moved; no global one did
    assert set(trainable_parameters(built)) == names  # the frozen tensors are trainable again


def test_a_bank_keeps_the_global_model_when_personalizing_hurts_its_validation(model):
    built, tokenizer = model
    train_local(built, tokenizer, news(96, [1 / 3] * 3, seed=2), TRAIN, max_steps=12)
    global_state = federated_state(built)
    wrong = news(48, [1 / 3] * 3, seed=3)
    wrong.labels = (wrong.labels + 1) % 3  # labels that contradict the headlines
    valid = news(30, [1 / 3] * 3, seed=4)
    result = personalize(built, tokenizer, wrong, valid, TRAIN, part="head", steps=12)
    assert not result.kept
    assert result.valid_personalised is not None and result.valid_global is not None
    assert result.valid_personalised["loss"] > result.valid_global["loss"]
    assert not _changed(global_state, federated_state(built))  # back to the global model, bit for bit


def test_personalizing_learns_the_banks_own_label_mix(model):
    """A bank whose own rows are mostly one class: its personalised head fits its prior (plain
    cross-entropy, no logit adjustment), so on its own rows it is no worse than the global model."""
    built, tokenizer = model
    train_local(built, tokenizer, news(96, [1 / 3] * 3, seed=5), TRAIN, max_steps=6)
    own = news(48, [0.1, 0.1, 0.8], seed=6)
    valid = news(30, [0.1, 0.1, 0.8], seed=7)
    result = personalize(built, tokenizer, own, valid, TRAIN, part="head", steps=12)
    assert result.kept
    assert result.valid_personalised is not None and result.valid_global is not None
    assert result.valid_personalised["loss"] < result.valid_global["loss"]


def test_the_label_prior_moves_only_the_heads_bias_and_matches_the_banks_label_mix(model):
    """Minimising cross-entropy over a bias shift matches the model's mean predicted distribution on the
    bank's rows to the bank's label shares, up to the weak L2 penalty: its first-order condition."""
    built, tokenizer = model
    own = news(200, [0.05, 0.15, 0.8], seed=8)
    start = federated_state(built)
    shift = fit_label_prior(built, tokenizer, own, 64)
    changed = _changed(start, federated_state(built))
    bias = [name for name in changed if name.startswith("head.")]
    assert changed == set(bias) and len(bias) == 1 and bias[0].endswith("bias")
    assert torch.allclose(federated_state(built)[bias[0]] - start[bias[0]], shift)
    predicted = logits_of(built, tokenizer, own).softmax(dim=1).mean(dim=0)
    shares = torch.bincount(torch.as_tensor(own.labels), minlength=3).float() / len(own)
    # zero gradient of mean CE(logits + b) + |b|^2 / 2n: mean softmax = shares - b / n
    assert torch.allclose(predicted, shares - shift / len(own), atol=2e-3), (predicted, shares, shift)
    assert torch.allclose(predicted, shares, atol=0.015)
    assert shift[2] - shift[0] > 1.0  # the untrained model predicts about a third each: a large move


def test_a_class_missing_from_the_banks_rows_stays_possible(model):
    built, tokenizer = model
    own = news(60, [0.5, 0.5, 0.0], seed=9)
    shift = fit_label_prior(built, tokenizer, own, 64)
    assert torch.isfinite(shift).all()
    assert 0 < logits_of(built, tokenizer, own).softmax(dim=1)[:, 2].mean() < 0.1


def test_the_label_prior_reaches_a_skewed_banks_mix_that_a_few_head_steps_do_not(tiny_setting):
    """A global model trained on balanced rows, a bank 90% negative: one fine-tuning step of the head
    barely moves its bias; with the label prior first, the bank's validation loss is far lower."""
    losses = {}
    for label_prior in (False, True):
        torch.manual_seed(0)
        built, tokenizer = build_model(tiny_model(), len(CLASSES), 0)
        train_local(built, tokenizer, news(96, [1 / 3] * 3, seed=5), TRAIN, max_steps=6)
        own, valid = news(64, [0.9, 0.05, 0.05], seed=10), news(40, [0.9, 0.05, 0.05], seed=11)
        result = personalize(built, tokenizer, own, valid, TRAIN, part="head", steps=1, label_prior=label_prior)
        assert result.valid_personalised is not None
        losses[label_prior] = result.valid_personalised["loss"]
    assert losses[True] < 0.8 * losses[False], losses


def test_a_bank_whose_fine_tuning_hurts_keeps_its_label_prior(tiny_setting):
    """Train rows with the bank's label mix but texts shuffled across rows: the prior is right, the
    fine-tuning learns noise; the bank keeps the global model with its label prior, bit for bit."""
    torch.manual_seed(0)
    built, tokenizer = build_model(tiny_model(), len(CLASSES), 0)
    train_local(built, tokenizer, news(96, [1 / 3] * 3, seed=5), TRAIN, max_steps=12)
    own, valid = news(64, [0.8, 0.1, 0.1], seed=12), news(40, [0.8, 0.1, 0.1], seed=13)
    own.texts = list(np.random.default_rng(0).permutation(own.texts))
    noisy = replace(TRAIN, lr=3e-2)
    result = personalize(built, tokenizer, own, valid, noisy, part="head+lora", steps=30, label_prior=True)
    assert result.choice == "label prior", result
    assert result.valid_prior is not None and result.valid_personalised is not None and result.valid_global
    assert result.valid_prior["loss"] < result.valid_global["loss"]
    assert result.valid_prior["loss"] < result.valid_personalised["loss"]
    assert evaluate(built, tokenizer, valid, 64) == result.valid_prior  # the model holds what was chosen


def _row(bank: str, personalised: float, alone: float, global_: float = 0.5) -> BankComparison:
    return BankComparison(bank, 20, global_, personalised, 0.7, alone, "fine-tuned")


def test_verdicts_follow_the_numbers():
    rows = [_row("a", 0.8, 0.6), _row("b", 0.6, 0.6, global_=0.7)]
    found = verdicts(rows)
    assert found["every_bank_better_off_than_alone"] is True  # a tie counts as not worse off
    assert found["personalised_at_least_global_every_bank"] is False  # bank b: 0.6 < 0.7
    assert found["worst_bank"]["personalised"] == {"bank": "b", "accuracy": 0.6}
    assert verdicts([_row("a", 0.5, 0.6)])["every_bank_better_off_than_alone"] is False
    alone_missing = [_row("a", 0.8, math.nan)]
    assert verdicts(alone_missing)["every_bank_better_off_than_alone"] is None
    assert "every bank better off than alone: not run (baseline=false)" in verdict_lines(alone_missing)
    assert verdicts(alone_missing)["worse_than_alone_beyond_chance"] is None  # nothing to test against


TEST_WORDING = "exact McNemar test on each bank's own test rows, one-sided p < 0.05"


def test_the_paired_test_names_only_the_banks_worse_beyond_chance():
    one_row_short = replace(_row("small", 0.89, 0.95), p_worse_than_alone=0.5, p_worse_than_global=1.0)
    really_worse = replace(_row("large", 0.70, 0.80), p_worse_than_alone=0.001, p_worse_than_global=0.2)
    found = verdicts([one_row_short, really_worse])
    assert found["every_bank_better_off_than_alone"] is False  # the strict line stays strict
    assert found["worse_than_alone_beyond_chance"] == ["large"]
    assert found["worse_than_global_beyond_chance"] == []
    lines = verdict_lines([one_row_short, really_worse])
    against_alone = [line for line in lines if line.startswith("banks worse off than alone beyond chance")]
    against_global = [line for line in lines if line.startswith("banks worse off than global beyond chance")]
    assert against_alone == [f"banks worse off than alone beyond chance ({TEST_WORDING}): large"], lines
    assert against_global == [f"banks worse off than global beyond chance ({TEST_WORDING}): none"], lines


def test_the_report_says_how_banks_personalised():
    rows = [_row("a", 0.8, 0.6)]
    plain = "\n".join(markdown_section(rows, PersonalizeConfig(steps=20)))
    assert "fine-tunes its head for 20 steps" in plain and "label mix" not in plain
    prior = "\n".join(markdown_section(rows, PersonalizeConfig(steps=5, part="head+lora", label_prior=True)))
    assert "shifts its head's bias to its own label mix, then fine-tunes its head+lora for 5 steps" in prior
    assert "| a | 20 | 0.5000 | 0.8000 | 0.7000 | 0.6000 | fine-tuned |" in prior


def test_each_bank_gets_its_own_seeded_test_split_only_with_personalization(tmp_path, tiny_setting):
    csv = write_news_csv(tmp_path / "news.csv", 300)
    overrides = [*news_data_overrides(csv), "federation=dirichlet", "federation.num_banks=3"]
    first = prepare_federation(config(*overrides, "personalize.steps=5"), tmp_path / "a")
    again = prepare_federation(config(*overrides, "personalize.steps=5"), tmp_path / "b")
    without = prepare_federation(config(*overrides), tmp_path / "c")
    assert load_bank(first.test_dir).train.texts == load_bank(without.test_dir).train.texts  # the global test set
    for folder, same, plain in zip(first.bank_dirs, again.bank_dirs, without.bank_dirs, strict=True):
        bank, twin, other = load_bank(folder), load_bank(same), load_bank(plain)
        assert bank.test is not None and bank.valid is not None and other.test is None
        assert bank.test.texts == twin.test.texts  # deterministic in the seed
        rows = len(bank.train) + len(bank.valid) + len(bank.test)
        assert rows == len(other.train) + len(other.valid)  # held out of the same bank's rows
        assert len(bank.test) == round(0.2 * rows)


def test_personalize_settings_are_checked():
    with pytest.raises(ValueError, match="personalize.part"):
        compose_config(["personalize.part=fusion"])
    with pytest.raises(ValueError, match="personalize.test_fraction"):
        compose_config(["personalize.test_fraction=1.0"])


def test_tfns_parity_composes_with_and_without_dp():
    """The TFNS preset (no training): MiniLM on TFNS, 10 Dirichlet(0.3) banks, baselines and personalised
    heads; `privacy=dp` turns DP on with bench_dp's TFNS_DP recipe, which the preset carries."""
    from fingpt_federated.simulations.bench_dp import TFNS_DP

    cfg = compose_config(["+experiment=tfns_parity"])
    assert (cfg.data.name, cfg.model.backbone) == ("tfns", compose_config([]).model.backbone)
    assert (cfg.federation.partitioner, cfg.federation.num_banks, cfg.federation.alpha) == ("dirichlet", 10, 0.3)
    assert cfg.strategy.name == "fedavg" and cfg.model.train.logit_adjustment == 1.0
    assert cfg.baseline and cfg.personalize.part == "head+lora"
    # each bank personalises with the budget it trains alone with: no more local work than alone
    assert cfg.personalize.steps == cfg.federation.rounds * cfg.strategy.local_steps
    assert not cfg.privacy.dp.enabled
    dp = compose_config(["+experiment=tfns_parity", "privacy=dp"])
    assert dp.privacy.dp.enabled
    assert dp.privacy.dp.target_epsilon == 8.0 and dp.privacy.dp.delta == 1e-5
    assert compose_config(["+experiment=tfns_parity", "privacy=dp", *TFNS_DP]) == dp


@pytest.mark.slow
def test_quick_parity_through_fingpt_sim(tmp_path, tiny_setting):
    """quick_parity as `fingpt-sim +experiment=quick_parity` runs it, shortened to 2 rounds: the per-bank
    table is in report.md and summary.json for every bank, accuracies in [0, 1], yes/no lines that match."""
    from fingpt_federated.simulations.sim import simulate

    cfg = compose_config(["+experiment=quick_parity", "federation.rounds=2", "publish.enabled=false"])
    summary = simulate(cfg, tmp_path / "run", echo=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    per_bank = saved["per_bank"]
    assert [row["bank"] for row in per_bank["banks"]] == summary.banks
    for row in per_bank["banks"]:
        for column in ("global", "personalised", "pooled", "alone"):
            assert 0.0 <= row[column] <= 1.0
    personalised = np.array([row["personalised"] for row in per_bank["banks"]])
    alone = np.array([row["alone"] for row in per_bank["banks"]])
    global_ = np.array([row["global"] for row in per_bank["banks"]])
    assert per_bank["every_bank_better_off_than_alone"] == bool((personalised >= alone).all())
    assert per_bank["personalised_at_least_global_every_bank"] == bool((personalised >= global_).all())
    assert 0 < saved["federated_over_pooled"] < 2
    report = (tmp_path / "run" / "report.md").read_text()
    for bank in summary.banks:
        assert re.search(rf"^\| {re.escape(bank)} \| \d+ \| [01]\.\d{{4}} \|", report, re.MULTILINE)
    alone_line = "yes" if per_bank["every_bank_better_off_than_alone"] else "no"
    assert f"- every bank better off than alone: {alone_line}" in report
    at_least = "yes" if per_bank["personalised_at_least_global_every_bank"] else "no"
    assert f"- personalised >= global for every bank: {at_least}" in report
    # the paired test against alone runs on every bank (the alone models' predictions were kept): a bank
    # named worse beyond chance is one the strict line also calls worse
    for row in per_bank["banks"]:
        assert 0.0 < row["p_worse_than_alone"] <= 1.0 and 0.0 < row["p_worse_than_global"] <= 1.0
    worse = per_bank["worse_than_alone_beyond_chance"]
    assert all(row["personalised"] < row["alone"] for row in per_bank["banks"] if row["bank"] in worse)
    assert "- banks worse off than alone beyond chance (exact McNemar" in report
    # the same comparison again on the finished run reproduces its table; other settings change it
    run = tmp_path / "run"
    again = tmp_path / "again.json"
    assert repersonalize_main([str(run), "--out", str(again)]) == 0
    assert json.loads(again.read_text())["banks"] == per_bank["banks"]
    assert repersonalize_main([str(run), "--out", str(again)]) == 2  # never over an existing file
    # the label prior added at prediction: tau 0 is the run's own round-2 test accuracy, tau 1 moves the loss
    shifted = tmp_path / "shifted.json"
    last = run / "checkpoints" / "round_0002" / "state.safetensors"
    assert prior_shift_main([str(run), "--state", str(last), "--tau", "0,1", "--out", str(shifted)]) == 0
    rows = json.loads(shifted.read_text())["rows"]
    round_2 = next(r["test_accuracy"] for r in saved["task_metrics"] if r.get("round") == 2 and "test_accuracy" in r)
    assert rows[0]["accuracy"] == pytest.approx(round_2) and rows[1]["loss"] != pytest.approx(rows[0]["loss"])
    assert sum(json.loads(shifted.read_text())["prior"]) == pytest.approx(1.0)
    other = tmp_path / "prior.json"
    assert repersonalize_main([str(run), "personalize.label_prior=true", "--out", str(other)]) == 0
    found = json.loads(other.read_text())
    assert found["personalize"]["label_prior"] is True
    assert [row["alone"] for row in found["banks"]] == [row["alone"] for row in per_bank["banks"]]


def test_prior_shift_refuses_a_folder_that_is_not_a_run_and_bad_taus(tmp_path, capsys):
    assert prior_shift_main([str(tmp_path)]) == 2
    assert "resolved_config.yaml is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prior_shift_main([str(tmp_path), "--tau", "1,x"])
    assert "numbers separated by commas" in capsys.readouterr().err
    for name in ("resolved_config.yaml", "federation_spec.json"):
        (tmp_path / name).write_text("{}")
    assert prior_shift_main([str(tmp_path)]) == 2  # a damaged run folder: one line, no traceback
    assert capsys.readouterr().err.startswith("prior_shift: error:")


def test_repersonalize_refuses_what_a_finished_run_cannot_change(tmp_path, capsys):
    assert repersonalize_main([str(tmp_path), "federation.rounds=3"]) == 2
    assert "only personalize.* and model.train.*" in capsys.readouterr().err
    assert repersonalize_main([str(tmp_path), "personalize.steps=5"]) == 2
    assert "not a finished fingpt-sim run: resolved_config.yaml is missing" in capsys.readouterr().err
    for name in ("resolved_config.yaml", "federation_spec.json", "global_state.safetensors"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "baselines.json").write_text('[{"kind": "centralized", "unexpected": 1}]')
    assert repersonalize_main([str(tmp_path)]) == 2  # a damaged run folder: one line, no traceback
    assert capsys.readouterr().err.startswith("repersonalize: error:")
