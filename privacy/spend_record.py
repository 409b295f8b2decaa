"""The operator's record of what each bank spent of its privacy budget in a run, as it travels.

The operator builds it from its checkpointed history (server/privacy_record.py) and sends it with
every train message under DP (protocol.DP_SPENT); a bank checks its ledger against it before it
trains (privacy/ledger_check.py). Kept free of Opacus: the wire protocol imports it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SpentRecord:
    """What a bank reported in its accepted train replies of one run: the largest epsilon, and in how many rounds."""

    epsilon: float
    rounds: int

    @property
    def spent(self) -> bool:
        return self.epsilon > 0 or self.rounds > 0


def encode(records: Mapping[str, SpentRecord]) -> str:
    """The wire form of {bank: record} (a JSON object of [epsilon, rounds] pairs)."""
    return json.dumps({bank: [record.epsilon, record.rounds] for bank, record in sorted(records.items())})


def decode(text: str) -> dict[str, SpentRecord]:
    """{bank: record} from `encode`'s form; anything else is a ValueError saying what was expected."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("the operator's privacy record is not JSON") from None
    if not isinstance(document, dict):
        raise ValueError("the operator's privacy record must map bank names to [epsilon, rounds]")
    records = {}
    for bank, value in document.items():
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(item, int | float) and not isinstance(item, bool) for item in value)
            or not math.isfinite(value[0])
            or value[0] < 0
            or value[1] < 0
            or value[1] != int(value[1])
        ):
            raise ValueError(f"the operator's privacy record of bank {bank!r} must be [epsilon >= 0, rounds >= 0]")
        records[str(bank)] = SpentRecord(float(value[0]), int(value[1]))
    return records
