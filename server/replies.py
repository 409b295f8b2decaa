"""What a bank's reply says: an error, a stale receipt, a declined round, its metrics.

Used by `BankRounds` (server/bank_rounds.py) to decide, before any aggregation, which replies
count; nothing here knows about strategies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from flwr.app import Message

from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import Receipt
from fingpt_federated.model.task_metrics import AUC_SHARE, ROC_AUC

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TYPED = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.S)


def short_reason(reason: str) -> str:
    """The bank's exception message out of Flower's error reason.

    Flower reports a ClientApp exception as "<class 'T'>:<'message'>"; in a simulation the
    message is Ray's whole remote traceback, ending in "Message: <the exception message>".
    """
    text = _ANSI.sub("", reason).strip()
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1].removesuffix("'>")
    elif match := _TYPED.fullmatch(text):
        text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return " ".join(text.split()) or reason


def check_reply(reply: Message, server_round: int, state_hash: str) -> tuple[str, Receipt | None]:
    """Why a reply cannot be used ("" if it can), and the bank's receipt when it sent one."""
    if reply.has_error():
        return short_reason(reply.error.reason or "no reason given"), None
    content = reply.content
    if protocol.RECEIPT not in content.config_records:
        return "reply without a bank receipt (not the fingpt-federated ClientApp?)", None
    receipt = Receipt.from_config(content.config_records[protocol.RECEIPT])
    if receipt.server_round != server_round or receipt.state_hash != state_hash:
        return (
            f"stale reply: it answers round {receipt.server_round} / state {receipt.state_hash[:12]}, "
            f"expected round {server_round} / state {state_hash[:12]}"
        ), receipt
    return "", receipt


def declined_reason(reply: Message) -> str:
    """Why the bank declined to train ("" if it did not decline)."""
    records = reply.content.config_records
    if protocol.STATUS not in records or records[protocol.STATUS].get("status") != protocol.DECLINED:
        return ""
    return str(records[protocol.STATUS].get("reason", "no reason given"))


def reply_metrics(reply: Message) -> Mapping[str, Any]:
    """The bank's metrics ({} when the reply carries none)."""
    records = reply.content.metric_records
    return dict(records[protocol.METRICS]) if protocol.METRICS in records else {}


def reported_examples(reply: Message) -> float:
    """The example count a train or evaluate reply reports: its weight in the mean (the update checks refuse a reply
    without a positive finite one before any strategy reads it)."""
    examples = reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]
    assert isinstance(examples, int | float)
    return float(examples)


UNIT_INTERVAL_METRICS = frozenset({"accuracy", "macro_f1", ROC_AUC, AUC_SHARE})
"""Evaluate metrics that are shares: honest code reports them within [0, 1]."""


def unusable_metrics(metrics: Mapping[str, Any]) -> str:
    """Why an evaluate reply's `metrics` must not be averaged ("" if they may).

    One NaN or infinite value would make the federation's validation metrics NaN (a train reply's
    loss is NaN under DP on purpose, and its state is checked by server/update_checks.py instead);
    a share outside [0, 1], a negative loss or a record count that is not a positive whole number
    cannot come from the banks' code and would steer the federation's validation metrics, and with
    them the round `publish.select=best` publishes. Values inside the ranges remain the bank's word
    (docs/threat-model.md)."""
    numbers = {name: value for name, value in metrics.items() if isinstance(value, int | float)}
    bad = sorted(name for name, value in numbers.items() if not math.isfinite(value))
    if bad:
        return f"non-finite evaluation metric(s) {', '.join(bad)}"
    out_of_range = [
        f"{name} {numbers[name]!r} (not within [0, 1])"
        for name in sorted(UNIT_INTERVAL_METRICS & set(numbers))
        if not 0.0 <= numbers[name] <= 1.0
    ]
    if numbers.get("loss", 0.0) < 0:
        out_of_range.append(f"loss {numbers['loss']!r} (negative)")
    examples = numbers.get(protocol.NUM_EXAMPLES)
    if examples is not None and (examples < 1 or examples != int(examples)):
        out_of_range.append(f"{protocol.NUM_EXAMPLES} {examples!r} (not a positive whole number)")
    return f"evaluation metric(s) out of range: {', '.join(out_of_range)}" if out_of_range else ""
