"""The audit's figures: ROC curves of the canary attack; backdoor success (and the untriggered target rate,
the model's own baseline) and clean accuracy per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fingpt_federated.simulations.attacks.membership import auc, roc_curve  # noqa: E402


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One ROC curve per run (log-log, where low-FPR membership inference is read), with chance."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (inside, outside) in curves.items():
        fpr, tpr = roc_curve(inside, outside)
        ax.plot(np.maximum(fpr, 1e-3), np.maximum(tpr, 1e-3), label=f"{label} (AUC {auc(inside, outside):.2f})")
    ax.plot([1e-3, 1], [1e-3, 1], "k--", linewidth=0.8, label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="false positive rate (twins flagged)",
        ylabel="true positive rate (canaries found)",
        title="Canary membership inference",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_backdoor(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    for row in rows:
        rounds = [r["round"] for r in row["rounds"]]
        (line,) = left.plot(rounds, [r["success_rate"] for r in row["rounds"]], marker="o", label=row["defence"])
        baseline = [r["untriggered_target_rate"] for r in row["rounds"]]
        left.plot(rounds, baseline, linestyle=":", color=line.get_color())  # target rate without the trigger
        right.plot(rounds, [r["clean_accuracy"] for r in row["rounds"]], marker="o", label=row["defence"])
    left.set(xlabel="round", ylabel="attack success (dotted: untriggered target rate)", title="Backdoor", ylim=(0, 1))
    right.set(xlabel="round", ylabel="clean test accuracy", title="Clean accuracy", ylim=(0, 1))
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
