"""Per-bank comparison after a simulated federation: the global, personalised, pooled and alone models.

With `personalize.steps > 0` every bank holds its own test split (data/federation_layout.py). After
the run each bank takes the final global model, fits its own statistics (series normaliser, static
features) on its train rows as its ClientApp does, and personalises a local part of it
(client/personalization.py). All of them are scored on that bank's own test split: the global
model, the personalised model, and, with `baseline=true`, the bank alone and the centralized
(pooled) model of simulations/baselines.py. The bank's accuracy is what the table holds.

"Better off than alone" on a bank of 9 or 19 test rows turns on one row, so beside the strict yes/no
lines every bank's personalised model is compared row by row with its global model and with the bank
alone by the exact McNemar test (simulations/paired_test.py): the banks worse off beyond chance
(one-sided p < 0.05) are named. The strict lines stay the verdict; the test says which misses are real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from fingpt_federated.client.personalization import personalize
from fingpt_federated.client.training import fit_to_bank
from fingpt_federated.conf.schema import PersonalizeConfig
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import logits_of, metrics_of
from fingpt_federated.model.state import load_federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.simulations.baselines import CENTRALIZED, LOCAL, BaselineResult
from fingpt_federated.simulations.paired_test import SIGNIFICANCE, p_worse
from fingpt_federated.simulations.table_format import figure
from fingpt_federated.structured_config import build

METRIC = "accuracy"
COLUMNS = ("global", "personalised", "pooled", "alone")


@dataclass(frozen=True)
class BankComparison:
    """One bank's accuracy on its own test split (NaN where a model was not trained: no baselines)."""

    bank: str
    test_rows: int
    global_: float
    personalised: float
    pooled: float
    alone: float
    kept: str  # what the bank kept, the best on its validation split: global, label prior or fine-tuned
    p_worse_than_global: float = math.nan  # one-sided exact McNemar p, personalised worse than global
    p_worse_than_alone: float = math.nan  # the same against the bank alone (NaN: no alone predictions)

    def value(self, column: str) -> float:
        return float(getattr(self, "global_" if column == "global" else column))

    def to_dict(self) -> dict:
        row = asdict(self)
        row["global"] = row.pop("global_")
        return row


def personalize_settings(cfg: DictConfig) -> PersonalizeConfig:
    return build(PersonalizeConfig, cfg.get("personalize"), "personalize")


def compare_banks(
    cfg: DictConfig,
    spec: FederationSpec,
    global_state: Path,
    baselines: Sequence[BaselineResult],
    threads: int | None = None,
) -> list[BankComparison]:
    """Every bank's row of the comparison; `threads` limits torch's threads as for the baselines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _compare(cfg, spec, global_state, baselines)
    finally:
        torch.set_num_threads(previous)


def _compare(
    cfg: DictConfig, spec: FederationSpec, global_state: Path, baselines: Sequence[BaselineResult]
) -> list[BankComparison]:
    settings = personalize_settings(cfg)
    model_cfg = config_dict(cfg.model)
    train_cfg = TrainConfig.from_mapping(model_cfg.get("train") or {})
    model, tokenizer = build_model(model_cfg, spec.num_classes, spec.num_features)
    final = load_file(str(global_state))
    pooled: dict[str, dict[str, float]] = next((b.own_tests for b in baselines if b.kind == CENTRALIZED), {})
    alone = {b.bank: b.own_tests[b.bank] for b in baselines if b.kind == LOCAL and b.bank in b.own_tests}
    alone_predicted = {b.bank: b.own_predictions[b.bank] for b in baselines if b.kind == LOCAL and b.own_predictions}
    rows = []
    for site in spec.banks:
        bank = load_bank(site.path)
        if bank.test is None:
            raise ValueError(f"bank {site.name} has no own test split ({site.path}/test): personalize.steps was 0")
        load_federated_state(model, final)
        fit_to_bank(model, bank.train)
        labels = np.asarray(bank.test.labels)
        global_logits = logits_of(model, tokenizer, bank.test, train_cfg.eval_batch_size)
        result = personalize(
            model,
            tokenizer,
            bank.train,
            bank.valid,
            train_cfg,
            part=settings.part,
            steps=settings.steps,
            label_prior=settings.label_prior,
        )
        personal_logits = logits_of(model, tokenizer, bank.test, train_cfg.eval_batch_size)
        personal_predicted = personal_logits.argmax(dim=1).numpy()
        alone_of_bank = alone_predicted.get(site.name)
        rows.append(
            BankComparison(
                site.name,
                len(bank.test),
                metrics_of(global_logits, labels)[METRIC],
                metrics_of(personal_logits, labels)[METRIC],
                pooled.get(site.name, {}).get(METRIC, math.nan),
                alone.get(site.name, {}).get(METRIC, math.nan),
                result.choice,
                p_worse(personal_predicted, global_logits.argmax(dim=1).numpy(), labels),
                math.nan if alone_of_bank is None else p_worse(personal_predicted, np.asarray(alone_of_bank), labels),
            )
        )
    return rows


def verdicts(rows: Sequence[BankComparison]) -> dict[str, object]:
    """The worst bank of each model, and whether personalised >= alone / >= global for every bank.

    A verdict against the bank alone is None when the alone models were not trained (baseline=false).
    """
    worst = {}
    for column in COLUMNS:
        scored = [row for row in rows if not math.isnan(row.value(column))]
        if scored:
            low = min(scored, key=lambda row: row.value(column))
            worst[column] = {"bank": low.bank, METRIC: low.value(column)}
    has_alone = all(not math.isnan(row.alone) for row in rows)
    tested_alone = all(not math.isnan(row.p_worse_than_alone) for row in rows)
    return {
        "worst_bank": worst,
        "every_bank_better_off_than_alone": all(r.personalised >= r.alone for r in rows) if has_alone else None,
        "personalised_at_least_global_every_bank": all(r.personalised >= r.global_ for r in rows),
        "worse_than_alone_beyond_chance": _significant(rows, "p_worse_than_alone") if tested_alone else None,
        "worse_than_global_beyond_chance": _significant(rows, "p_worse_than_global"),
    }


def _significant(rows: Sequence[BankComparison], p_field: str) -> list[str]:
    """The banks whose personalised model is worse beyond chance (p below SIGNIFICANCE; NaN is not)."""
    return [row.bank for row in rows if float(getattr(row, p_field)) < SIGNIFICANCE]


def summary(rows: Sequence[BankComparison], settings: PersonalizeConfig) -> dict[str, object]:
    """The comparison as summary.json holds it."""
    return {
        "metric": METRIC,
        "split": "each bank's own test split",
        "personalize": asdict(settings),
        "banks": [row.to_dict() for row in rows],
        **verdicts(rows),
    }


def markdown_section(rows: Sequence[BankComparison], settings: PersonalizeConfig) -> list[str]:
    """The report's section: the per-bank table, the worst bank of each model, the two yes/no lines."""
    table = ["| bank | test rows | global | personalised | pooled | alone | kept |", "|" + " --- |" * 7]
    table += [
        f"| {r.bank} | {r.test_rows} | {figure(r.global_)} | {figure(r.personalised)} | {figure(r.pooled)} "
        f"| {figure(r.alone)} | {r.kept} |"
        for r in rows
    ]
    return [
        "## Per bank: global, personalised, pooled and alone (accuracy on each bank's own test split)",
        "Personalization: each bank "
        + ("shifts its head's bias to its own label mix, then " if settings.label_prior else "")
        + f"fine-tunes its {settings.part} for {settings.steps} steps on its train split, "
        "from the final global model; it keeps the global, label-prior or fine-tuned model, "
        "the best on its validation split "
        f"(own test split: {settings.test_fraction:.0%} of each bank's rows, held out before training). "
        "Pooled and alone are the centralized and local-only baselines.",
        "\n".join(table),
        "\n".join(f"- {line}" for line in verdict_lines(rows)),
    ]


def verdict_lines(rows: Sequence[BankComparison]) -> list[str]:
    """The worst bank of each model and the two yes/no lines, as the report and the console print them."""
    found = verdicts(rows)
    worst = found["worst_bank"]
    assert isinstance(worst, dict)
    lines = [f"worst bank, {column}: {w['bank']} ({figure(w[METRIC])})" for column, w in worst.items()]
    alone = found["every_bank_better_off_than_alone"]
    lines.append(f"every bank better off than alone: {'not run (baseline=false)' if alone is None else _yes(alone)}")
    lines.append(f"personalised >= global for every bank: {_yes(found['personalised_at_least_global_every_bank'])}")
    test = f"exact McNemar test on each bank's own test rows, one-sided p < {SIGNIFICANCE:g}"
    for versus in ("alone", "global"):
        worse = found[f"worse_than_{versus}_beyond_chance"]
        if worse is not None:
            assert isinstance(worse, list)
            lines.append(f"banks worse off than {versus} beyond chance ({test}): {', '.join(worse) or 'none'}")
    return lines


def _yes(value: object) -> str:
    return "yes" if value else "no"
