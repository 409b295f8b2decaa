"""Every metric of a run, one row per (round, phase, bank), kept across restarts.

Phases: "train" (a bank's local training), "evaluate" (a bank's validation of the global model),
"central" (the ServerApp's own evaluation on a held-out test set). The bank "federation" holds
the example-weighted aggregates Flower computes from the banks' rows. Failed and dropped replies
are rows too (status "failed" / "dropped", with the reason), so a report shows who was missing.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fingpt_federated.model.task_metrics import resolve_shares
from fingpt_federated.strict_json import jsonable

FEDERATION = "federation"
CENTRAL = "central"
PHASES = ("train", "evaluate", CENTRAL)


@dataclass
class MetricRow:
    round: int
    phase: str
    bank: str
    status: str = "ok"
    node_id: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""


@dataclass
class History:
    rows: list[MetricRow] = field(default_factory=list)

    def add(
        self,
        server_round: int,
        phase: str,
        bank: str,
        metrics: Mapping[str, Any] | None = None,
        *,
        status: str = "ok",
        node_id: int | None = None,
        reason: str = "",
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        values = {name: float(value) for name, value in (metrics or {}).items() if isinstance(value, (int, float))}
        values = resolve_shares(values)  # a reply's ROC-AUC comes with its share (model/task_metrics.py)
        self.rows.append(MetricRow(server_round, phase, bank, status, node_id, values, reason))

    def up_to(self, last_round: int) -> History:
        """The rows of rounds 0..last_round: what a checkpoint of `last_round` vouches for."""
        return History([row for row in self.rows if row.round <= last_round])

    def select(self, phase: str, bank: str | None = None, status: str = "ok") -> list[MetricRow]:
        return [r for r in self.rows if r.phase == phase and r.status == status and (bank is None or r.bank == bank)]

    def validation(self, metric: str) -> dict[int, float]:
        """Round -> the federation's validation `metric` of the global model (rounds where it is finite)."""
        return {
            row.round: row.metrics[metric]
            for row in self.select("evaluate", FEDERATION)
            if math.isfinite(row.metrics.get(metric, math.nan))
        }

    def banks(self) -> list[str]:
        """Names of the banks that appear in the history, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if row.bank not in (FEDERATION, CENTRAL):
                seen.setdefault(row.bank)
        return list(seen)

    def to_json(self) -> str:
        return json.dumps({"rows": [jsonable(asdict(row)) for row in self.rows]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> History:
        rows = []
        for row in json.loads(text)["rows"]:
            metrics = {name: math.nan if value is None else value for name, value in row.pop("metrics").items()}
            rows.append(MetricRow(**row, metrics=metrics))
        return cls(rows)

    def to_csv(self) -> str:
        """A flat table: fixed columns, then one column per metric name seen anywhere."""
        names = sorted({name for row in self.rows for name in row.metrics})
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["round", "phase", "bank", "status", "node_id", *names, "reason"])
        for row in self.rows:
            values = [_cell(row.metrics.get(name)) for name in names]
            writer.writerow([row.round, row.phase, row.bank, row.status, row.node_id or "", *values, row.reason])
        return out.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)
