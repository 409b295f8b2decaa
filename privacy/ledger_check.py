"""A bank's check of its privacy ledger against the operator's record, before it trains.

A ledger lives on the bank's disk (privacy/dp_budget.py): deleted, restored from an old backup,
or left behind by a bank started with another state folder, it would open fresh or behind, and
the bank would hand out its budget a second time without noticing. So the operator keeps its own
record of what each bank reported spending in the run (privacy/spend_record.py) and sends it with
every train message; `open_checked` refuses to train against a ledger that is missing or holds
less epsilon than that record, and says how to restore it. A ledger ahead of the record is fine
(the operator may have lost its newest checkpoint, or refused a reply after the bank trained).

The record protects a bank from losing its own ledger; a bank that wants to overspend can
ignore it, which the operator cannot prevent (its customers' guarantee is the bank's own ledger).
"""

from __future__ import annotations

from pathlib import Path

from fingpt_federated.privacy.dp_budget import LedgerError, PrivacyLedger
from fingpt_federated.privacy.spend_record import SpentRecord

_RELATIVE_TOLERANCE = 1e-6
"""Epsilon is recomputed from the accountant history on every open; allow for float noise only."""


class LedgerBehindRecord(LedgerError):
    """The bank's ledger is missing or behind what the operator recorded: training would reset the budget."""


def _restore_hint(path: Path) -> str:
    return (
        f"copy the ledger back to {path} from a backup (the latest one), or start the bank with the state folder "
        f"that holds it (fingpt-client --state-dir, node config state-dir); the bank refuses to train until then"
    )


def open_checked(
    path: Path,
    record: SpentRecord | None,
    *,
    bank: str,
    run: str,
    accountant: str,
    delta: float,
    target_epsilon: float | None,
) -> PrivacyLedger:
    """`PrivacyLedger.open`, refused (LedgerBehindRecord) when the operator's `record` says the bank
    has spent budget in `run` and the ledger is missing, or holds less epsilon than recorded.

    A missing ledger is refused before `open` would create a fresh one.
    """
    if record is not None and record.spent and not path.exists():
        raise LedgerBehindRecord(
            f"bank {bank}: its privacy ledger {path} is missing, but the operator recorded epsilon "
            f"{record.epsilon:.4f} spent in {record.rounds} trained round(s) of run {run!r}: a new ledger would "
            f"hand out the budget a second time. To restore it, {_restore_hint(path)}"
        )
    ledger = PrivacyLedger.open(path, run=run, accountant=accountant, delta=delta, target_epsilon=target_epsilon)
    if record is not None:
        spent = ledger.epsilon_spent()
        if spent < record.epsilon * (1 - _RELATIVE_TOLERANCE) - 1e-12:
            raise LedgerBehindRecord(
                f"bank {bank}: its privacy ledger {path} holds epsilon {spent:.4f}, but the operator recorded "
                f"{record.epsilon:.4f} spent in {record.rounds} trained round(s) of run {run!r}: the ledger is "
                f"older than the bank's spend (an old backup, or another state folder). To restore it, "
                f"{_restore_hint(path)}"
            )
    return ledger
