"""A bank's privacy ledger: every DP-SGD step it has taken in a run, on disk, and its budget.

Epsilon is never stored as the truth: the ledger keeps the accountant history (noise
multiplier, sample rate, steps) and recomputes epsilon through an Opacus accountant, so a
reloaded ledger (after a restart, a crash, a new process per round) continues exactly where the
last one stopped. The run, accountant, delta and budget are fixed when the ledger is created;
opening it with others, or opening a damaged or foreign file, is a `LedgerError` and never a
silent reset: a reset would hand out the budget a second time. A missing file is created fresh
by `open`; in a federation the bank first checks that the operator has recorded no spend it would
lose (privacy/ledger_check.py).

Besides DP-SGD rounds a ledger records one-off releases (`record_release`): a statistic of the
bank's records published once under the Gaussian mechanism, charged to the same history, and
kept with the ledger so that a restart reuses it instead of paying for it again.

A round is charged *before* it trains: `begin_round` checks the budget and persists the planned
spend as pending; `end_round` replaces it by what was actually taken. A process that dies in
between leaves the pending spend, which the next `open` charges in full (the steps may have run;
the ledger errs on the side of the customers). Writes are atomic (privacy/atomic_file.py).
One process writes a bank's ledger at a time: a bank trains one round at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opacus.accountants import IAccountant

from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.dp_accounting import (
    Spend,
    accountant_with,
    calibrate_noise,
    compose,
    epsilon,
    extension,
)
from fingpt_federated.privacy.dp_settings import ACCOUNTANTS

log = logging.getLogger(__name__)

FORMAT = "fingpt-federated/dp-ledger"
VERSION = 1
LEDGER_FOLDER = "privacy"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class LedgerError(ValueError):
    """The ledger file is damaged, not a ledger, or belongs to another run, accountant or delta."""


class BudgetExceeded(RuntimeError):
    """A round would take a bank past its privacy budget; it was refused before training."""

    def __init__(
        self, spent: float, projected: float, budget: float, delta: float, steps: int, detail: str | None = None
    ) -> None:
        self.spent, self.projected, self.budget, self.delta, self.steps = spent, projected, budget, delta, steps
        super().__init__(
            detail
            or f"privacy budget exhausted: {steps} more DP-SGD steps would spend epsilon {projected:.4f} "
            f"(delta {delta:g}) against the bank's budget of {budget:g}; {spent:.4f} is spent already"
        )


@dataclass(frozen=True)
class Plan:
    """How the noise was calibrated: `steps` in total at `sample_rate`, after what the ledger held
    then, spend `epsilon` <= target."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    target_epsilon: float
    epsilon: float


def ledger_path(state_dir: str | Path, run: str) -> Path:
    """Where a bank keeps the ledger of `run` inside its state folder."""
    safe = _UNSAFE.sub("_", run).strip("._") or "run"
    return Path(state_dir) / LEDGER_FOLDER / f"dp-ledger-{safe}.json"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class PrivacyLedger:
    """The accountant history and budget of one bank in one run; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        *,
        run: str,
        accountant: str = "prv",
        delta: float,
        target_epsilon: float | None,
        history: tuple[Spend, ...] = (),
        pending: dict[str, Any] | None = None,
        rounds: list[dict[str, Any]] | None = None,
        plan: Plan | None = None,
        released: dict[str, list[float]] | None = None,
        created: str | None = None,
    ) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        self.path = Path(path)
        self.run = run
        self.accountant = accountant
        self.delta = float(delta)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.history = history
        self.pending = pending
        self.rounds = rounds if rounds is not None else []
        self.plan = plan
        self.released = released if released is not None else {}
        self.created = created or _now()

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        run: str,
        accountant: str,
        delta: float,
        target_epsilon: float | None,
    ) -> PrivacyLedger:
        """The ledger at `path`, created (and written) if absent; a round left unfinished is charged."""
        path = Path(path)
        if not path.exists():
            ledger = cls(path, run=run, accountant=accountant, delta=delta, target_epsilon=target_epsilon)
            ledger.save()
            return ledger
        ledger = cls.load(path)
        expected = {
            "run": run,
            "accountant": accountant,
            "delta": float(delta),
            "target_epsilon": None if target_epsilon is None else float(target_epsilon),
        }
        found = {
            "run": ledger.run,
            "accountant": ledger.accountant,
            "delta": ledger.delta,
            "target_epsilon": ledger.target_epsilon,
        }
        differs = [
            f"{key} {found[key]!r} (asked for {expected[key]!r})" for key in expected if found[key] != expected[key]
        ]
        if differs:
            raise LedgerError(
                f"{path} belongs to another budget: {', '.join(differs)}. A ledger is fixed when it is "
                f"created; use the same settings, or a new run (another ledger file) for new ones"
            )
        if ledger.pending is not None:
            ledger._charge_unfinished()
        return ledger

    @classmethod
    def load(cls, path: str | Path) -> PrivacyLedger:
        """Read a ledger as it is on disk; anything malformed is a LedgerError naming the file."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerError(f"{path}: cannot read the privacy ledger ({error})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise LedgerError(f"{path} is not a privacy ledger (format is not {FORMAT!r})")
        if document.get("version") != VERSION:
            raise LedgerError(f"{path}: ledger version {document.get('version')!r}, this code reads {VERSION}")
        stored = document.pop("sha256", None)
        if stored != _digest(document):
            raise LedgerError(f"{path}: checksum mismatch, the ledger was damaged or edited by hand")
        try:
            plan = document["plan"]
            return cls(
                path,
                run=str(document["run"]),
                accountant=document["accountant"],
                delta=document["delta"],
                target_epsilon=document["target_epsilon"],
                history=tuple(Spend(*entry) for entry in document["history"]),
                pending=document["pending"],
                rounds=list(document["rounds"]),
                plan=None if plan is None else Plan(**plan),
                released={str(name): list(values) for name, values in document.get("released", {}).items()},
                created=document["created"],
            )
        except (KeyError, TypeError, ValueError) as error:
            raise LedgerError(f"{path}: malformed privacy ledger ({error})") from None

    def save(self) -> None:
        body = {
            "format": FORMAT,
            "version": VERSION,
            "run": self.run,
            "accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "created": self.created,
            "plan": None if self.plan is None else asdict(self.plan),
            "history": [list(spend.as_tuple()) for spend in self.history],
            "pending": self.pending,
            "rounds": self.rounds,
            "released": self.released,
        }
        document = {**body, "sha256": _digest(body)}
        atomic_write_bytes(self.path, (json.dumps(document, indent=1) + "\n").encode("utf-8"))

    @property
    def steps(self) -> int:
        """DP-SGD steps charged so far (a pending round's planned steps included)."""
        return sum(spend.steps for spend in self._charged())

    def epsilon_spent(self, delta: float | None = None) -> float:
        """Epsilon of everything charged so far, at `delta` (default: the ledger's)."""
        return epsilon(self._charged(), self.delta if delta is None else delta, self.accountant)

    def epsilon_after(self, spend: Spend) -> float:
        """Epsilon after everything charged so far and then `spend`, at the ledger's delta."""
        return epsilon(compose(self._charged(), spend), self.delta, self.accountant)

    def would_exceed(self, next_steps: int, noise_multiplier: float, sample_rate: float) -> bool:
        """Whether `next_steps` more steps would take the bank past its budget (never, without one)."""
        if self.target_epsilon is None:
            return False
        return self.epsilon_after(Spend(noise_multiplier, sample_rate, next_steps)) > self.target_epsilon

    def check(self, spend: Spend) -> float:
        """The epsilon after `spend`; raises BudgetExceeded (before any training) if over budget."""
        projected = self.epsilon_after(spend)
        if self.target_epsilon is not None and projected > self.target_epsilon:
            raise BudgetExceeded(self.epsilon_spent(), projected, self.target_epsilon, self.delta, spend.steps)
        return projected

    def opacus_accountant(self) -> IAccountant:
        """A fresh Opacus accountant holding the committed history, to continue it in a PrivacyEngine."""
        if self.pending is not None:
            raise RuntimeError(f"{self.path}: a round is in progress; its accountant was handed out already")
        return accountant_with(self.accountant, self.history)

    def set_plan(self, plan: Plan) -> None:
        """Record how the noise was calibrated, once: later rounds and restarts reuse it."""
        if self.plan is not None and self.plan != plan:
            raise LedgerError(f"{self.path}: the noise was calibrated already ({self.plan})")
        self.plan = plan
        self.save()

    def record_release(self, name: str, spend: Spend, values: Sequence[float]) -> float:
        """Charge a one-off release of `values` (already noised) and keep them; returns epsilon spent.

        Raises BudgetExceeded, recording nothing, when the release would exceed the budget, and
        LedgerError when `name` was released already (use `released[name]`: paying twice for
        the same statistic would spend budget for nothing).
        """
        if self.pending is not None:
            raise RuntimeError(f"{self.path}: round {self.pending['round']!r} has not ended")
        if name in self.released:
            raise LedgerError(f"{self.path}: {name!r} was released already")
        self.check(spend)
        self.history = compose(self.history, spend)
        self.released[name] = [float(value) for value in values]
        pending = {"round": f"release {name}", **asdict(spend), "started": _now()}
        spent = self.epsilon_spent()
        self._log_round(pending, spend.steps, spent, "released")
        return spent

    def begin_round(self, label: str, spend: Spend) -> float:
        """Check the budget and charge `spend` ahead (persisted as pending); returns the projected epsilon."""
        if self.pending is not None:
            raise RuntimeError(f"{self.path}: round {self.pending['round']!r} has not ended")
        projected = self.check(spend)
        self.pending = {"round": label, **asdict(spend), "started": _now()}
        self.save()
        return projected

    def end_round(self, history: Sequence[Spend], *, status: str = "completed") -> float:
        """Replace the pending charge by what the round's accountant recorded; returns epsilon spent.

        `history` is the full history of the Opacus accountant that was restored from this
        ledger and then ran the round: it must extend the committed history. It is recorded as
        it is (those steps happened) and then, if the round took other steps than it reserved
        (more of them, or another noise or sample rate), that is raised as an error.
        """
        if self.pending is None:
            raise RuntimeError(f"{self.path}: no round in progress")
        pending = self.pending
        added = extension(self.history, history)
        self.history, self.pending = tuple(history), None
        steps = sum(spend.steps for spend in added)
        spent = self.epsilon_spent()
        self._log_round(pending, steps, spent, status)
        mechanisms = {(spend.noise_multiplier, spend.sample_rate) for spend in added}
        if steps > pending["steps"] or mechanisms - {(pending["noise_multiplier"], pending["sample_rate"])}:
            raise RuntimeError(
                f"round {pending['round']!r} reserved {pending['steps']} steps at noise "
                f"{pending['noise_multiplier']} and sample rate {pending['sample_rate']} but took {list(added)}"
            )
        return spent

    def _charged(self) -> tuple[Spend, ...]:
        if self.pending is None:
            return self.history
        pending = self.pending
        return compose(self.history, Spend(pending["noise_multiplier"], pending["sample_rate"], pending["steps"]))

    def _charge_unfinished(self) -> None:
        if self.pending is None:
            raise RuntimeError(f"{self.path}: no unfinished round to charge")
        pending = self.pending
        self.history, self.pending = self._charged(), None
        spent = self.epsilon_spent()
        log.warning(
            "%s: round %r never ended; its %d planned steps are charged in full (epsilon %.4f)",
            self.path,
            pending["round"],
            pending["steps"],
            spent,
        )
        self._log_round(pending, pending["steps"], spent, "unfinished, charged in full")

    def _log_round(self, pending: Mapping[str, Any], steps: int, spent: float, status: str) -> None:
        self.rounds.append(
            {
                "round": pending["round"],
                "status": status,
                "steps": steps,
                "noise_multiplier": pending["noise_multiplier"],
                "sample_rate": pending["sample_rate"],
                "epsilon": spent if math.isfinite(spent) else None,
                "started": pending["started"],
                "ended": _now(),
            }
        )
        self.save()


def noise_multiplier_for(
    ledger: PrivacyLedger, *, configured: float | None, sample_rate: float, planned_steps: int
) -> float:
    """The noise multiplier of the bank's next round.

    `configured` when given (the bank's choice; the ledger still accounts for it exactly). Else
    the ledger's calibration, made once ahead of the first round so that `planned_steps` steps
    in the whole run (planned rounds x local steps) at `sample_rate`, after whatever the ledger
    holds already (a released label histogram), spend at most the bank's budget, and reused after
    restarts: recalibrating mid-run to the remaining budget would let the noise drift with every
    restart. Raises BudgetExceeded when no noise level fits the budget.
    """
    if configured is not None:
        return float(configured)
    if ledger.plan is not None:
        return ledger.plan.noise_multiplier
    if ledger.target_epsilon is None:
        raise ValueError("neither a noise_multiplier nor a target_epsilon to calibrate one: set one of them")
    try:
        sigma = calibrate_noise(
            target_epsilon=ledger.target_epsilon,
            delta=ledger.delta,
            sample_rate=sample_rate,
            steps=planned_steps,
            mechanism=ledger.accountant,
            spent=ledger.history,
        )
    except ValueError:
        raise BudgetExceeded(
            ledger.epsilon_spent(),
            math.inf,
            ledger.target_epsilon,
            ledger.delta,
            planned_steps,
            detail=f"privacy budget exhausted: no noise multiplier keeps {planned_steps} planned DP-SGD steps "
            f"within the bank's budget of {ledger.target_epsilon:g} (delta {ledger.delta:g}) under the "
            f"{ledger.accountant} accountant; raise the budget or plan fewer steps (prv certifies smaller epsilons)",
        ) from None
    spent = ledger.epsilon_after(Spend(sigma, sample_rate, planned_steps))
    ledger.set_plan(Plan(sigma, sample_rate, planned_steps, ledger.target_epsilon, spent))
    log.info(
        "%s: noise multiplier %.4f calibrated for %d steps at sample rate %.5f: epsilon %.3f of %g",
        ledger.path,
        sigma,
        planned_steps,
        sample_rate,
        spent,
        ledger.target_epsilon,
    )
    return sigma
