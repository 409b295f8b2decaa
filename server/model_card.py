"""What a published model's card says about its run, read from the run's history: final and per-round
metrics, the privacy each bank spent, the banks that took part (the card itself: model/card.py)."""

from __future__ import annotations

import math
from typing import Any

from fingpt_federated.server.history import CENTRAL, FEDERATION, History


def final_metrics(history: History) -> dict[str, Any]:
    """The last round's central test metrics and the banks' aggregated validation metrics, where present."""
    result: dict[str, Any] = {}
    for key, phase, bank in (
        ("test", CENTRAL, CENTRAL),
        ("banks_validation", "evaluate", FEDERATION),
        ("banks_training", "train", FEDERATION),
    ):
        rows = history.select(phase, bank)
        if rows:
            last = max(rows, key=lambda r: r.round)
            result[key] = {"round": last.round, **last.metrics}
    return result


def round_metrics(history: History, server_round: int) -> dict[str, Any]:
    """The metrics of one round: the operator's test set (pooled) and the banks' aggregated validation."""
    result: dict[str, Any] = {}
    for key, phase, bank in (("test", CENTRAL, CENTRAL), ("banks_validation", "evaluate", FEDERATION)):
        rows = [row for row in history.select(phase, bank) if row.round == server_round]
        if rows:
            result[key] = {"round": server_round, **rows[-1].metrics}
    return result


def privacy_spent(history: History) -> dict[str, dict[str, float]]:
    """Per bank, (epsilon, delta) after its last trained round, from the banks' DP metrics."""
    spent: dict[str, dict[str, float]] = {}
    for row in sorted(history.select("train"), key=lambda r: r.round):
        if row.bank != FEDERATION and "epsilon" in row.metrics:
            spent[row.bank] = {
                "epsilon": row.metrics["epsilon"],
                "delta": row.metrics.get("delta", math.nan),
                "round": row.round,
            }
    return spent


def participating_banks(history: History) -> list[str]:
    return sorted({row.bank for row in history.select("train") if row.bank not in (FEDERATION, CENTRAL)})
