"""The audit section of a published model's card (server/model_card.py calls these two).

An audit exists for a run when `audit.json` (simulations/audit.py) is in the run folder or in the folder
above it: `fingpt-audit` trains its federations in sub-folders of its own run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

AUDIT_JSON = "audit.json"
KEPT = {
    "membership": (
        "model",
        "privacy",
        "epsilon_target",
        "epsilon_spent",
        "mia_auc",
        "tpr_at_fpr_0_01",
        "epsilon_lower",
    ),
    "backdoor": ("defence", "banks", "hostile", "success_rate", "untriggered_target_rate", "clean_accuracy"),
}


def audit_of_run(run: str | Path | None) -> dict[str, Any] | None:
    """The headline figures of the run's audit, or None when there is none (or it cannot be read)."""
    if not run:
        return None
    for folder in (Path(run), Path(run).parent):
        path = folder / AUDIT_JSON
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
                return {"file": str(path)} | {
                    part: [{key: row.get(key) for key in keys} for row in found.get(part, [])]
                    for part, keys in KEPT.items()
                }
            except (OSError, ValueError, AttributeError):
                return None
    return None


def audit_lines(audit: dict[str, Any] | None) -> list[str]:
    """Markdown lines of the card's audit section (none without an audit)."""
    if not audit:
        return []
    lines = ["## Privacy and robustness audit", "", f"From `{audit['file']}` (fingpt-audit).", ""]
    lines += ["| model attacked | privacy | epsilon target | spent | canary AUC | TPR@FPR 1% | epsilon lower (95%) |"]
    lines += ["| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [
        "| " + " | ".join(_cell(row.get(key)) for key in KEPT["membership"]) + " |" for row in audit["membership"]
    ]
    lines += [
        "",
        "| backdoor defence | banks | hostile banks | attack success | untriggered target rate | clean accuracy |",
    ]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in KEPT["backdoor"]) + " |" for row in audit["backdoor"]]
    return [*lines, ""]


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "-" if math.isnan(float(value)) else f"{float(value):.3g}"
    return "-" if value is None else str(value)
