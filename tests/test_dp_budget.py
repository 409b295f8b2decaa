"""The privacy ledger: restarts, budgets checked ahead, crashes, damaged and foreign files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.dp_accounting import Spend, compose
from fingpt_federated.privacy.dp_budget import (
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    ledger_path,
    noise_multiplier_for,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DELTA = 1e-5
ROUND = Spend(1.1, 0.05, 40)


def _open(path, *, accountant="rdp", delta=DELTA, target_epsilon=8.0, run="run-a"):
    return PrivacyLedger.open(path, run=run, accountant=accountant, delta=delta, target_epsilon=target_epsilon)


def _train_round(ledger: PrivacyLedger, label: str, spend: Spend = ROUND) -> float:
    ledger.begin_round(label, spend)
    return ledger.end_round(compose(ledger.history, spend))


def _independent(mechanism: str, steps: int, spend: Spend = ROUND) -> float:
    accountant = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    accountant.history = [(spend.noise_multiplier, spend.sample_rate, steps)]
    return accountant.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_continues_after_a_restart(tmp_path, mechanism):
    path = ledger_path(tmp_path, "run-a")
    first = _open(path, accountant=mechanism)
    after_one = _train_round(first, "1")
    assert after_one == pytest.approx(_independent(mechanism, 40), abs=1e-6)

    del first  # the process restarts: only the file remains
    second = _open(path, accountant=mechanism)
    assert second.epsilon_spent() == pytest.approx(after_one, abs=1e-9)
    after_two = _train_round(second, "2")
    assert after_two > after_one
    assert after_two == pytest.approx(_independent(mechanism, 80), abs=1e-6)
    assert [r["round"] for r in PrivacyLedger.load(path).rounds] == ["1", "2"]


def test_a_round_that_would_exceed_the_budget_is_refused_before_it_is_charged(tmp_path):
    path = ledger_path(tmp_path, "run-a")
    ledger = _open(path, target_epsilon=4.0)
    big = Spend(1.1, 0.05, 400)
    assert not ledger.would_exceed(ROUND.steps, ROUND.noise_multiplier, ROUND.sample_rate)
    assert ledger.would_exceed(big.steps, big.noise_multiplier, big.sample_rate)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded, match="budget of 4") as refused:
        ledger.begin_round("1", big)
    assert refused.value.projected > 4.0 and refused.value.spent == 0.0
    assert path.read_bytes() == before and ledger.pending is None
    _train_round(ledger, "1")  # a smaller round still fits


def test_no_budget_means_accounting_only(tmp_path):
    ledger = _open(ledger_path(tmp_path, "r"), target_epsilon=None)
    assert not ledger.would_exceed(10**6, 0.5, 0.5)


def test_a_round_that_never_ended_is_charged_in_full_on_the_next_open(tmp_path):
    path = ledger_path(tmp_path, "run-a")
    ledger = _open(path)
    ledger.begin_round("1", ROUND)  # the process dies during training
    reopened = _open(path)
    assert reopened.pending is None and reopened.history == (ROUND,)
    assert reopened.rounds[-1]["status"] == "unfinished, charged in full"
    assert reopened.epsilon_spent() == pytest.approx(_independent("rdp", 40), abs=1e-6)


def test_a_round_is_charged_with_the_steps_it_really_took(tmp_path):
    ledger = _open(ledger_path(tmp_path, "r"))
    ledger.begin_round("1", ROUND)
    assert ledger.steps == 40  # charged ahead while running
    ledger.end_round(compose(ledger.history, Spend(1.1, 0.05, 25)))
    assert ledger.steps == 25 and ledger.rounds[-1]["steps"] == 25


def test_taking_more_than_reserved_is_recorded_and_raised(tmp_path):
    path = ledger_path(tmp_path, "r")
    ledger = _open(path)
    ledger.begin_round("1", ROUND)
    with pytest.raises(RuntimeError, match="reserved 40"):
        ledger.end_round(compose(ledger.history, Spend(1.1, 0.05, 41)))
    assert PrivacyLedger.load(path).steps == 41


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        ({"accountant": "prv"}, "accountant"),
        ({"delta": 1e-6}, "delta"),
        ({"target_epsilon": 16.0}, "target_epsilon"),
        ({"run": "run-b"}, "run"),
    ],
)
def test_a_foreign_ledger_is_an_error_not_a_reset(tmp_path, changed, message):
    path = ledger_path(tmp_path, "run-a")
    _train_round(_open(path), "1")
    before = path.read_bytes()
    with pytest.raises(LedgerError, match=message):
        _open(path, **changed)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: text.replace('"steps": 40', '"steps": 4'),  # edited
        lambda text: json.dumps({"history": []}),  # not a ledger
        lambda text: "\x00\xff garbage",
    ],
)
def test_a_damaged_ledger_is_an_error(tmp_path, damage):
    path = ledger_path(tmp_path, "run-a")
    _train_round(_open(path), "1")
    path.write_text(damage(path.read_text()))
    with pytest.raises(LedgerError):
        _open(path)


def test_a_crash_in_the_middle_of_a_write_leaves_the_old_ledger_intact(tmp_path):
    path = ledger_path(tmp_path, "run-a")
    ledger = _open(path)
    _train_round(ledger, "1")
    before = path.read_bytes()
    # The bytes the ledger would write when round 2 begins ...
    ahead = PrivacyLedger.load(path)
    ahead.path = tmp_path / "elsewhere.json"
    ahead.begin_round("2", ROUND)
    # ... written by a real process that dies (SIGKILL) after writing them, before the rename.
    crash = textwrap.dedent(
        f"""
        import os, signal
        import fingpt_federated.privacy.atomic_file as atomic
        atomic.os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        atomic.atomic_write_bytes({str(path)!r}, {ahead.path.read_bytes()!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", crash], cwd=os.getcwd(), capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert path.read_bytes() == before
    assert any(p.name.endswith(".tmp") for p in path.parent.iterdir())  # the torn write, ignored
    reopened = _open(path)
    assert reopened.pending is None and reopened.history == (ROUND,)
    _train_round(reopened, "2")
    assert _open(path).steps == 80


def test_atomic_write_cleans_up_after_a_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def fail(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("fingpt_federated.privacy.atomic_file.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    assert oct(target.stat().st_mode & 0o777) == "0o600"


def test_calibration_happens_once_and_survives_restarts(tmp_path):
    path = ledger_path(tmp_path, "run-a")
    ledger = _open(path, target_epsilon=3.0)
    sigma = noise_multiplier_for(ledger, configured=None, sample_rate=0.05, planned_steps=5 * 40)
    assert ledger.plan.epsilon <= 3.0
    # Five rounds of 40 steps at the calibrated noise fit the budget exactly; a sixth does not.
    reopened = _open(path, target_epsilon=3.0)
    assert noise_multiplier_for(reopened, configured=None, sample_rate=0.2, planned_steps=1) == sigma
    for label in "12345":
        _train_round(reopened, label, Spend(sigma, 0.05, 40))
    assert 3.0 - 0.03 <= reopened.epsilon_spent() <= 3.0
    assert reopened.would_exceed(40, sigma, 0.05)
    assert noise_multiplier_for(reopened, configured=0.7, sample_rate=0.05, planned_steps=1) == 0.7


def test_a_budget_no_noise_level_can_meet_is_refused_like_an_exceeded_one(tmp_path):
    # RDP cannot certify epsilon below log(1/delta) / (largest order - 1) ~ 0.19 at delta 1e-5.
    ledger = _open(ledger_path(tmp_path, "r"), target_epsilon=0.05)
    with pytest.raises(BudgetExceeded, match="no noise multiplier keeps 3 planned"):
        noise_multiplier_for(ledger, configured=None, sample_rate=1.0, planned_steps=3)
    assert ledger.plan is None


def test_a_release_is_charged_kept_across_restarts_and_calibrated_around(tmp_path):
    path = ledger_path(tmp_path, "run-a")
    ledger = _open(path, target_epsilon=3.0)
    spent = ledger.record_release("label_counts", Spend(20.0, 1.0, 1), [10.5, 0.0, 3.25])
    independent = RDPAccountant()
    independent.history = [(20.0, 1.0, 1)]
    assert spent == pytest.approx(independent.get_epsilon(delta=DELTA), abs=1e-9) and spent > 0
    reopened = _open(path, target_epsilon=3.0)
    assert reopened.released == {"label_counts": [10.5, 0.0, 3.25]} and reopened.history == (Spend(20.0, 1.0, 1),)
    with pytest.raises(LedgerError, match="released already"):
        reopened.record_release("label_counts", Spend(20.0, 1.0, 1), [1.0, 1.0, 1.0])
    sigma = noise_multiplier_for(reopened, configured=None, sample_rate=0.05, planned_steps=200)
    assert reopened.plan.epsilon <= 3.0
    _train_round(reopened, "1", Spend(sigma, 0.05, 200))
    assert 3.0 - 0.03 <= reopened.epsilon_spent() <= 3.0  # the release and the steps together


def test_a_release_over_the_budget_records_nothing(tmp_path):
    ledger = _open(ledger_path(tmp_path, "r"), target_epsilon=0.5)
    with pytest.raises(BudgetExceeded):
        ledger.record_release("label_counts", Spend(1.0, 1.0, 1), [1.0, 2.0])
    reopened = _open(ledger_path(tmp_path, "r"), target_epsilon=0.5)
    assert reopened.released == {} and reopened.history == ()
