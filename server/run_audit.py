"""The `fingpt-audit` of a run, when there is one, for the card of a model published from it.

An audit exists for a run when `audit.json` (simulations/audit.py writes it) is in the run folder or
in the folder above it: `fingpt-audit` trains its federations in sub-folders of its own run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fingpt_federated.model.card import AUDIT_KEPT

AUDIT_JSON = "audit.json"


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
                    for part, keys in AUDIT_KEPT.items()
                }
            except (OSError, ValueError, AttributeError):
                return None
    return None
