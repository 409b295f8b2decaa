"""Each bank's privacy spend in a simulated federation's report: epsilon after every round.

The banks report the epsilon their ledger has spent so far (the whole run, at their delta) with
every train reply; a bank over its budget declines instead. The report shows both per bank and
round as a table (`epsilon_section`) and as a plot against each bank's budget (`plot_epsilon`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fingpt_federated.server.history import FEDERATION, History  # noqa: E402
from fingpt_federated.simulations.report import markdown_table, round_axis  # noqa: E402

EPSILON_PLOT = "epsilon.png"
DECLINED = "declined"


def epsilon_by_bank(history: History) -> dict[str, dict[int, float | str]]:
    """bank -> round -> epsilon spent after that round, or "declined"; rounds a bank was not asked are absent."""
    cells: dict[str, dict[int, float | str]] = {}
    for row in history.rows:
        if row.phase != "train" or row.bank == FEDERATION:
            continue
        if row.status == "ok" and "epsilon" in row.metrics:
            cells.setdefault(row.bank, {})[row.round] = float(row.metrics["epsilon"])
        elif row.status == DECLINED:
            cells.setdefault(row.bank, {})[row.round] = DECLINED
    return cells


def epsilon_section(history: History, budgets: Mapping[str, float | None]) -> list[str]:
    """The report's privacy section (a heading, a sentence and the table); empty without DP rounds."""
    cells = epsilon_by_bank(history)
    if not cells:
        return []
    deltas = {r.bank: r.metrics["delta"] for r in history.select("train") if "delta" in r.metrics}
    rounds = sorted({number for per_round in cells.values() for number in per_round})
    header = ["bank", "budget (epsilon)", "delta", *[f"round {n}" for n in rounds]]
    rows = [
        [
            bank,
            _budget(budgets.get(bank)),
            f"{deltas[bank]:g}" if bank in deltas else "-",
            *[_cell(cells[bank].get(n)) for n in rounds],
        ]
        for bank in sorted(cells)
    ]
    return [
        "## Privacy: epsilon each bank has spent (whole run so far) after every round",
        "Record-level (epsilon, delta)-DP of each bank's customers; a bank whose next round would exceed its "
        "budget declines it. A blank cell: the bank was not asked that round.",
        markdown_table(header, rows),
        f"![epsilon]({EPSILON_PLOT})",
    ]


def plot_epsilon(history: History, budgets: Mapping[str, float | None], path: Path) -> Path:
    """Epsilon spent per bank and round (declined rounds as crosses), each budget as a dashed line."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for bank, per_round in sorted(epsilon_by_bank(history).items()):
        spent = [(n, value) for n, value in sorted(per_round.items()) if not isinstance(value, str)]
        (line,) = ax.plot([n for n, _ in spent], [value for _, value in spent], marker="o", label=bank)
        last = 0.0
        for n, value in sorted(per_round.items()):
            if isinstance(value, str):
                ax.plot([n], [last], marker="x", markersize=9, color=line.get_color())
            else:
                last = value
    limits = sorted({b for b in budgets.values() if b is not None})
    for budget in limits:
        ax.axhline(budget, linestyle="--", color="grey", linewidth=1)
        ax.annotate(
            f"budget {budget:g}",
            (0, budget),
            xycoords=("axes fraction", "data"),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize=7,
            color="grey",
        )
    round_axis(ax)
    ax.set_ylabel("epsilon spent (run so far)")
    ax.set_ylim(0, max([ax.get_ylim()[1], *limits]) * 1.1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2, loc="best")
    ax.set_title("Privacy spent per bank (x: declined, over budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(value: float | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else f"{value:.3f}"


def _budget(value: float | None) -> str:
    return "none (noise multiplier set)" if value is None or math.isinf(value) else f"{value:g}"
