"""The operator's record of each bank's privacy spend, stamped into every train message under DP.

A bank's ledger is the truth about its spend, but it lives on the bank's disk and can be lost or
replaced by an older one; a bank that then trained against a fresh ledger would spend its budget
a second time. The operator therefore records, per bank, the largest epsilon the bank reported in
the train replies of this run and in how many rounds (`spent_by_bank`, read from the History,
which every checkpoint carries, so the record survives a restart of the operator), and sends it
with every train message (protocol.DP_SPENT); the bank refuses to train when its ledger is missing
or behind it (privacy/ledger_check.py).

Which record a message carries: a node whose bank the operator knows (in a deployment over TLS from
the registry of bank keys, `federation.bank_registry`; else from a reply in this process or the node
ids in the History) gets its own bank's entry only. A node it cannot
name yet (the first round after a simulation restarts with new node ids, or a bank that came back
under a new node id) gets every bank's entry, since it may be any of them and its first round
must be checked too. That discloses the banks' names and spent epsilons to that node, which the
model card publishes at the end of the run anyway (server/model_card.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, RecordDict

from fingpt_federated.federation import protocol
from fingpt_federated.privacy import spend_record
from fingpt_federated.privacy.spend_record import SpentRecord
from fingpt_federated.server.history import FEDERATION, History


def spent_by_bank(history: History) -> dict[str, SpentRecord]:
    """Per bank, the largest finite epsilon its train rows carry and the number of rounds that carry one.

    Dropped stragglers count (the bank trained and spent); failed and declined rows carry no metrics.
    """
    largest: dict[str, float] = {}
    rounds: dict[str, set[int]] = {}
    for row in history.rows:
        value = row.metrics.get("epsilon")
        if row.phase != "train" or row.bank == FEDERATION or value is None or not math.isfinite(value):
            continue
        largest[row.bank] = max(largest.get(row.bank, 0.0), value)
        rounds.setdefault(row.bank, set()).add(row.round)
    return {bank: SpentRecord(largest[bank], len(rounds[bank])) for bank in largest}


def banks_by_node(history: History, known: Mapping[int, str]) -> dict[int, str]:
    """Node id -> bank name: the History's rows named by a receipt (latest wins), then `known` over them."""
    named = {
        row.node_id: row.bank
        for row in history.rows
        if row.node_id is not None and row.bank != FEDERATION and row.bank != f"node {row.node_id}"
    }
    return {**named, **known}


def stamp(messages: Iterable[Message], history: History, known: Mapping[int, str]) -> list[Message]:
    """The train messages, each carrying the record its node may see (module docstring); as they are without DP.

    Flower's strategies send one RecordDict to every node: a stamped message gets its own copy of
    the config record, the arrays are shared.
    """
    messages = list(messages)
    if not messages or protocol.DP_CONFIG not in messages[0].content.config_records[protocol.CONFIG]:
        return messages
    records = spent_by_bank(history)
    nodes = banks_by_node(history, known)
    for message in messages:
        bank = nodes.get(message.metadata.dst_node_id)
        visible = records if bank is None else {name: records[name] for name in (bank,) if name in records}
        config = ConfigRecord(dict(message.content.config_records[protocol.CONFIG]))
        config[protocol.DP_SPENT] = spend_record.encode(visible)
        message.content = RecordDict({**dict(message.content.items()), protocol.CONFIG: config})
    return messages
