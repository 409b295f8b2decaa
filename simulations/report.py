"""Tables, plots and the Markdown report of a simulated federation, from its History.

Plots (PNG, matplotlib's Agg backend, no display needed):
- `global.png`: accuracy and loss of the global model per round, on the global test set and
  averaged over the banks' validation splits, with the baselines as horizontal lines;
- `banks.png`: each bank's validation accuracy and loss of the global model per round;
- `task_metrics.png`: macro-F1 and ROC-AUC of the global model per round, test set and validation,
  with the round publishing chooses marked (server/best_round.py). The test set's ROC-AUC is pooled;
  the validation one is the example-weighted mean of the banks' own AUCs (model/task_metrics.py);
- under DP, `epsilon.png` (simulations/privacy_report.py): each bank's epsilon spent per round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fingpt_federated.server.best_round import RoundChoice  # noqa: E402
from fingpt_federated.server.history import CENTRAL, FEDERATION, History  # noqa: E402
from fingpt_federated.simulations.baselines import (  # noqa: E402
    CENTRALIZED,
    LOCAL,
    BaselineResult,
    mean_local,
)
from fingpt_federated.simulations.classical_baseline import classical_section  # noqa: E402
from fingpt_federated.simulations.table_format import figure  # noqa: E402

GLOBAL_PLOT = "global.png"
TASK_PLOT = "task_metrics.png"
TASK_COLUMNS = ("accuracy", "macro_f1", "roc_auc")
TASK_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "roc_auc": "ROC-AUC", "loss": "loss"}
BANKS_PLOT = "banks.png"
REPORT = "report.md"


@dataclass(frozen=True)
class RoundRow:
    round: int
    test_accuracy: float
    test_loss: float
    valid_accuracy: float
    valid_loss: float
    train_loss: float
    banks_ok: int
    banks_failed: int
    seconds: float
    upload_bytes: float = math.nan
    download_bytes: float = math.nan


def round_rows(history: History) -> list[RoundRow]:
    """One row per round (round 0 = the initial model), NaN where a value was not measured."""
    rounds = sorted({row.round for row in history.rows})
    rows = []
    for number in rounds:
        central = _one(history, number, CENTRAL, CENTRAL)
        valid = _one(history, number, "evaluate", FEDERATION)
        train = _one(history, number, "train", FEDERATION)
        trained = [r for r in history.rows if r.round == number and r.phase == "train" and r.bank != FEDERATION]
        rows.append(
            RoundRow(
                round=number,
                test_accuracy=central.get("accuracy", math.nan),
                test_loss=central.get("loss", math.nan),
                valid_accuracy=valid.get("accuracy", math.nan),
                valid_loss=valid.get("loss", math.nan),
                train_loss=train.get("train_loss", math.nan),
                banks_ok=sum(r.status == "ok" for r in trained),
                banks_failed=sum(r.status == "failed" for r in trained),
                seconds=central.get("round_seconds", math.nan),
                upload_bytes=train.get("upload_bytes", math.nan),
                download_bytes=train.get("download_bytes", math.nan) + valid.get("download_bytes", 0.0),
            )
        )
    return rows


def task_metric_rows(history: History) -> list[dict[str, float]]:
    """Per round: test_* (the operator's test set) and valid_* (the banks' aggregate) of loss and TASK_COLUMNS."""
    rows = []
    for number in sorted({row.round for row in history.rows}):
        central = _one(history, number, CENTRAL, CENTRAL)
        valid = _one(history, number, "evaluate", FEDERATION)
        row: dict[str, float] = {"round": number}
        for name in ("loss", *TASK_COLUMNS):
            row[f"test_{name}"] = central.get(name, math.nan)
            row[f"valid_{name}"] = valid.get(name, math.nan)
        rows.append(row)
    return rows


def task_metrics_section(history: History, choice: RoundChoice | None) -> list[str]:
    """The report's task-metric table per round, the plot, and the round publishing takes."""
    rows = task_metric_rows(history)
    header = (
        ["round"] + [f"test {TASK_LABELS[n]}" for n in TASK_COLUMNS] + [f"valid {TASK_LABELS[n]}" for n in TASK_COLUMNS]
    )
    body = [
        [
            f"**{int(r['round'])}**" if choice and r["round"] == choice.round else int(r["round"]),
            *(figure(r[f"test_{n}"]) for n in TASK_COLUMNS),
            *(figure(r[f"valid_{n}"]) for n in TASK_COLUMNS),
        ]
        for r in rows
    ]
    lines = [
        "## Task metrics per round",
        "Test: the operator's test set (ROC-AUC from its pooled scores). Valid: the banks' validation splits, "
        "example-weighted mean over the banks (ROC-AUC: mean of the per-bank AUCs over the banks whose split "
        "defines one, not a pooled AUC; one-vs-rest macro beyond two classes).",
        markdown_table(header, body),
    ]
    if choice is not None:
        lines.append(f"Monitor: validation {choice.monitor} ({choice.mode}); published: {choice.line()} (in bold).")
    return [*lines, f"![task metrics]({TASK_PLOT})"]


def plot_task_metrics(history: History, choice: RoundChoice | None, path: Path) -> Path:
    rows = task_metric_rows(history)
    x = [int(r["round"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("macro_f1", "roc_auc"), strict=True):
        ax.plot(x, [r[f"test_{metric}"] for r in rows], marker="o", label="global model, test set")
        ax.plot(x, [r[f"valid_{metric}"] for r in rows], marker="s", label="global model, banks' validation")
        if choice is not None:
            ax.axvline(choice.round, color="grey", linestyle=":", label=f"published (round {choice.round})")
        round_axis(ax)
        ax.set_ylabel(TASK_LABELS[metric])
    axes[0].legend(fontsize=8)
    fig.suptitle("Task metrics of the global model per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wire_bytes_per_parameter(history: History, num_params: int) -> tuple[float, float]:
    """Model-state bytes per parameter per bank in the last trained round: (upload, train download).

    fp32 arrays are 4 (plus a few header bytes); BFV or CKKS ciphertexts are what he.yaml's parameters
    make them. The first round of an encrypted run downloads nothing (no aggregate yet), hence the
    last round.
    """
    rows = [r for r in history.select("train", FEDERATION) if "upload_bytes" in r.metrics]
    if not rows or num_params <= 0:
        return math.nan, math.nan
    last = rows[-1]
    banks = [r for r in history.rows if r.round == last.round and r.phase == "train" and r.bank != FEDERATION]
    trained = sum(r.status in ("ok", "dropped") for r in banks)
    up = last.metrics["upload_bytes"] / max(trained, 1) / num_params
    return up, last.metrics.get("download_bytes", math.nan) / max(len(banks), 1) / num_params


def bank_series(history: History, metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per bank: the rounds it validated the global model in, and the metric each time."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in history.select("evaluate"):
        if row.bank == FEDERATION or metric not in row.metrics:
            continue
        rounds, values = series.setdefault(row.bank, ([], []))
        rounds.append(row.round)
        values.append(row.metrics[metric])
    return series


def plot_global(history: History, baselines: Sequence[BaselineResult], path: Path) -> Path:
    rows = round_rows(history)
    x = [r.round for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        ax.plot(x, [getattr(r, f"test_{metric}") for r in rows], marker="o", label="global model, test set")
        ax.plot(x, [getattr(r, f"valid_{metric}") for r in rows], marker="s", label="global model, banks' validation")
        for label, value, style in _baseline_lines(baselines, metric):
            ax.axhline(value, linestyle=style, color="grey", label=label)
        round_axis(ax)
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=8)
    fig.suptitle("Global model per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_banks(history: History, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        series = bank_series(history, metric)
        for bank, (rounds, values) in sorted(series.items()):
            ax.plot(rounds, values, marker=".", label=bank)
        if not series:
            ax.text(
                0.5,
                0.5,
                "no bank reported validation metrics\n(under DP: privacy.dp.report_validation)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        round_axis(ax)
        ax.set_ylabel(f"validation {metric}")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Global model on each bank's validation split")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(
    title: str,
    settings: dict[str, object],
    history: History,
    baselines: Sequence[BaselineResult],
    *,
    privacy: Sequence[str] = (),
    choice: RoundChoice | None = None,
    per_bank: Sequence[str] = (),
    progress: Sequence[str] = (),
) -> str:
    """The report: settings, the global model per round, its task metrics (and the round `choice` that
    publishing takes), each bank, `privacy` (sections on the privacy spent, see
    simulations/privacy_report.py), `progress` (rounds and seconds to the targets, simulations/progress.py),
    baselines, `per_bank` (the per-bank comparison of simulations/personalization.py), failures."""
    sections = [
        f"# {title}",
        markdown_table(["setting", "value"], [[key, value] for key, value in settings.items()]),
        "## Global model per round",
        markdown_table(
            [
                "round",
                "test accuracy",
                "test loss",
                "mean valid accuracy",
                "mean valid loss",
                "train loss",
                "banks ok",
                "banks failed",
                "seconds",
                "upload MB",
                "download MB",
            ],
            [
                [
                    r.round,
                    figure(r.test_accuracy),
                    figure(r.test_loss),
                    figure(r.valid_accuracy),
                    figure(r.valid_loss),
                    figure(r.train_loss),
                    r.banks_ok,
                    r.banks_failed,
                    figure(r.seconds, 1),
                    figure(r.upload_bytes / 1e6, 3),
                    figure(r.download_bytes / 1e6, 3),
                ]
                for r in round_rows(history)
            ],
        ),
        f"![global]({GLOBAL_PLOT})",
        *progress,
        *task_metrics_section(history, choice),
        "## Banks (the global model on each bank's validation split, last round it was asked)",
        markdown_table(
            ["bank", "round", "valid accuracy", "valid loss", "rounds trained", "failures"],
            [_bank_row(history, bank) for bank in sorted(history.banks())],
        ),
        *_withheld_note(history),
        f"![banks]({BANKS_PLOT})",
        *privacy,
    ]
    if baselines:
        sections += ["## Baselines (global test set, same step budget)", _baseline_table(history, baselines)]
        sections += classical_section(baselines, _federated_test(history))
    sections += per_bank
    failures = [r for r in history.rows if r.status != "ok"]
    if failures:
        sections += [
            "## Failed and dropped replies",
            markdown_table(
                ["round", "phase", "bank", "status", "reason"],
                [[r.round, r.phase, r.bank, r.status, _cell(r.reason)] for r in failures],
            ),
        ]
    return "\n\n".join(sections) + "\n"


def _withheld_note(history: History) -> list[str]:
    """A line naming the banks that answered evaluation with their row count only, if any did."""
    withheld = sorted(
        {
            r.bank
            for r in history.select("evaluate")
            if r.bank != FEDERATION and r.status == "ok" and "accuracy" not in r.metrics and "loss" not in r.metrics
        }
    )
    if not withheld:
        return []
    who = f"every bank ({len(withheld)})" if len(withheld) == len(history.banks()) else ", ".join(withheld)
    return [
        f"Validation metrics withheld by {who}: under DP a bank reports them only with "
        "`privacy.dp.report_validation` (they are computed from its records without noise)."
    ]


def _bank_row(history: History, bank: str) -> list[object]:
    evaluated = history.select("evaluate", bank)
    last = evaluated[-1] if evaluated else None
    metrics = last.metrics if last else {}
    failed = sum(1 for r in history.rows if r.bank == bank and r.status == "failed")
    return [
        bank,
        last.round if last else "-",
        figure(metrics.get("accuracy", math.nan)),
        figure(metrics.get("loss", math.nan)),
        len(history.select("train", bank)),
        failed,
    ]


def _federated_test(history: History) -> dict[str, float] | None:
    """The global model's test metrics after the last round that has them."""
    final = next((r for r in reversed(round_rows(history)) if not math.isnan(r.test_accuracy)), None)
    return None if final is None else _one(history, final.round, CENTRAL, CENTRAL)


def _baseline_table(history: History, baselines: Sequence[BaselineResult]) -> str:
    rows: list[list[object]] = []
    final = next((r for r in reversed(round_rows(history)) if not math.isnan(r.test_accuracy)), None)
    if final is not None:
        central = _one(history, final.round, CENTRAL, CENTRAL)
        rows.append(
            [
                f"federated (round {final.round})",
                "-",
                "-",
                figure(final.test_accuracy),
                figure(central.get("macro_f1", math.nan)),
                figure(final.test_loss),
            ]
        )
    for b in baselines:
        label = "centralized" if b.kind == CENTRALIZED else f"{b.kind}: {b.bank}"  # local-only, or a classical model
        rows.append(
            [
                label,
                b.train_rows,
                b.steps,
                figure(b.test["accuracy"]),
                figure(b.test.get("macro_f1", math.nan)),
                figure(b.test["loss"]),
            ]
        )
    rows.append(
        [
            "mean local-only",
            "-",
            "-",
            figure(mean_local(list(baselines))),
            figure(mean_local(list(baselines), "macro_f1")),
            figure(mean_local(list(baselines), "loss")),
        ]
    )
    return markdown_table(["model", "train rows", "steps", "test accuracy", "test macro-F1", "test loss"], rows)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def round_axis(ax: plt.Axes) -> None:
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _baseline_lines(baselines: Sequence[BaselineResult], metric: str) -> list[tuple[str, float, str]]:
    lines = [("centralized", b.test[metric], "--") for b in baselines if b.kind == CENTRALIZED]
    if any(b.kind == LOCAL for b in baselines):
        lines.append(("mean local-only", mean_local(list(baselines), metric), ":"))
    return lines


def _one(history: History, number: int, phase: str, bank: str) -> dict[str, float]:
    for row in history.rows:
        if row.round == number and row.phase == phase and row.bank == bank and row.status == "ok":
            return row.metrics
    return {}


def _cell(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
