"""A privacy budget that never decreases: the operator's record of each bank's spend, and the bank's check.

Unit tests of the record (server/privacy_record.py, privacy/spend_record.py) and of the ledger
check (privacy/ledger_check.py), then the real ServerApp and ClientApp through `InProcessGrid`:
a bank whose ledger is deleted between rounds, or that comes back after an operator restart with
another state folder (empty, or holding an old copy of its ledger), refuses to train with how to
restore the ledger, and trains again once it is restored.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from federation_helpers import (  # noqa: F401
    InProcessGrid,
    config,
    one_torch_thread,
    server_identity,
    simulated_nodes,
    write_federation,
)
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fingpt_federated.client.app import app as client_app
from fingpt_federated.federation import protocol
from fingpt_federated.privacy import spend_record
from fingpt_federated.privacy.dp_accounting import Spend
from fingpt_federated.privacy.dp_budget import PrivacyLedger, ledger_path
from fingpt_federated.privacy.ledger_check import LedgerBehindRecord, open_checked
from fingpt_federated.privacy.spend_record import SpentRecord
from fingpt_federated.server.app import run_federation
from fingpt_federated.server.bank_rounds import FederationRoundError
from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.server.privacy_record import spent_by_bank, stamp

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LEDGER = {"run": "run", "accountant": "rdp", "delta": 1e-5, "target_epsilon": None}


def spent_ledger(path: Path) -> PrivacyLedger:
    """A ledger that has paid for one release of 20 steps' worth of noise."""
    ledger = PrivacyLedger.open(path, **LEDGER)
    ledger.record_release("histogram", Spend(1.0, 0.1, 20), [1.0])
    return ledger


def open_with(path: Path, record: SpentRecord | None) -> PrivacyLedger:
    return open_checked(path, record, bank="bank_a", **LEDGER)


def test_the_record_travels_as_json_and_a_malformed_one_is_refused():
    records = {"bank_b": SpentRecord(2.5, 3), "bank_a": SpentRecord(0.0, 0)}
    assert spend_record.decode(spend_record.encode(records)) == records
    for text in ("[1]", '{"a": 1}', '{"a": [-1, 0]}', '{"a": [NaN, 1]}', '{"a": [1.0, 1.5]}', '{"a": [true, 1]}', "{"):
        with pytest.raises(ValueError, match="privacy record"):
            spend_record.decode(text)


def test_a_missing_ledger_is_refused_when_the_operator_recorded_a_spend_and_none_is_created(tmp_path):
    path = ledger_path(tmp_path / "state", "run")
    with pytest.raises(LedgerBehindRecord) as refused:
        open_with(path, SpentRecord(5.99, 2))
    message = str(refused.value)
    assert f"its privacy ledger {path} is missing" in message and "epsilon 5.9900 spent in 2 trained round" in message
    assert f"copy the ledger back to {path}" in message and "--state-dir" in message
    assert not path.exists()  # no fresh budget was written
    assert open_with(path, SpentRecord(0.0, 0)).epsilon_spent() == 0  # nothing recorded: a first round
    assert open_with(ledger_path(tmp_path / "other", "run"), None).steps == 0


def test_a_ledger_behind_the_record_is_refused_and_one_level_with_or_ahead_of_it_opens(tmp_path):
    path = ledger_path(tmp_path / "state", "run")
    spent = spent_ledger(path).epsilon_spent()
    assert spent > 0
    with pytest.raises(LedgerBehindRecord, match=rf"holds epsilon {spent:.4f}, but the operator recorded"):
        open_with(path, SpentRecord(spent * 1.001, 2))
    assert open_with(path, SpentRecord(spent * (1 + 1e-9), 1)).epsilon_spent() == spent  # float noise
    assert open_with(path, SpentRecord(spent / 2, 1)).epsilon_spent() == spent  # the operator lost a checkpoint


def history_of_two_banks() -> History:
    history = History()
    history.add(1, "train", "bank_a", {"epsilon": 1.0}, node_id=11)
    history.add(1, "train", "bank_b", {"epsilon": 0.7}, node_id=12)
    history.add(1, "train", FEDERATION, {"epsilon": 0.9})
    history.add(1, "evaluate", "bank_a", {"epsilon": 9.0}, node_id=11)
    history.add(2, "train", "bank_a", {"epsilon": 2.0}, status="dropped", node_id=11, reason="straggler")
    history.add(2, "train", "bank_b", status="failed", node_id=12, reason="crashed")
    history.add(3, "train", "bank_b", {"epsilon": float("nan")}, node_id=12)
    history.add(3, "train", "node 13", status="failed", node_id=13, reason="no receipt")
    return history


def test_the_operator_records_each_banks_largest_epsilon_and_its_trained_rounds():
    assert spent_by_bank(history_of_two_banks()) == {"bank_a": SpentRecord(2.0, 2), "bank_b": SpentRecord(0.7, 1)}
    restored = History.from_json(history_of_two_banks().to_json())  # what a checkpoint gives back
    assert spent_by_bank(restored) == spent_by_bank(history_of_two_banks())


def train_messages(nodes: list[int], dp: bool = True) -> list[Message]:
    """As Flower's strategies build them: one RecordDict shared by every node's message."""
    server_identity()
    config = ConfigRecord({protocol.SERVER_ROUND: 4})
    if dp:
        config[protocol.DP_CONFIG] = "{}"
    content = RecordDict({protocol.ARRAYS: ArrayRecord(), protocol.CONFIG: config})
    return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN) for node in nodes]


def sent_record(message: Message) -> dict[str, SpentRecord]:
    return spend_record.decode(str(message.content.config_records[protocol.CONFIG][protocol.DP_SPENT]))


def test_each_node_is_sent_its_own_banks_record_and_a_node_not_yet_named_every_banks():
    messages = train_messages([11, 12, 13, 14])
    shared = messages[0].content
    stamped = stamp(messages, history_of_two_banks(), {14: "bank_c"})
    assert [sent_record(m) for m in stamped] == [
        {"bank_a": SpentRecord(2.0, 2)},  # node 11 named by the History (a restarted operator)
        {"bank_b": SpentRecord(0.7, 1)},
        {"bank_a": SpentRecord(2.0, 2), "bank_b": SpentRecord(0.7, 1)},  # node 13 never sent a receipt
        {},  # bank_c is known and has spent nothing
    ]
    assert protocol.DP_SPENT not in shared.config_records[protocol.CONFIG]  # the strategy's record is untouched
    assert all(m.content.array_records[protocol.ARRAYS] is shared.array_records[protocol.ARRAYS] for m in stamped)
    assert [m.metadata.dst_node_id for m in stamped] == [11, 12, 13, 14]
    plain = stamp(train_messages([11], dp=False), history_of_two_banks(), {})
    assert protocol.DP_SPENT not in plain[0].content.config_records[protocol.CONFIG]


# The real ServerApp and ClientApp. A fixed noise multiplier and no target: a round repeated after a
# refused attempt is not declined for a budget calibrated to the planned rounds.
DP = [
    "privacy=dp",
    "privacy.dp.logical_batch_size=16",
    "privacy.dp.physical_batch_size=8",
    "privacy.dp.accountant=rdp",
    "privacy.dp.noise_multiplier=1.0",
    "privacy.dp.target_epsilon=null",
    "strategy.local_steps=3",
    "federation.rounds=3",
]


class OperatorCrash(RuntimeError):
    pass


class EventGrid(InProcessGrid):
    """Before sending the train messages of a round, runs that round's event (if any)."""

    def __init__(self, *args, events: dict, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.events = events

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        if messages[0].metadata.message_type == MessageType.TRAIN:
            event = self.events.pop(messages[0].content[protocol.CONFIG][protocol.SERVER_ROUND], None)
            if event is not None:
                event()
        return super().send_and_receive(messages, timeout=timeout)


def bank_ledger(tmp_path: Path, bank: int, state: Path | None = None) -> Path:
    return ledger_path(state or tmp_path / "data" / f"bank_{bank}" / "state", "run")


def grid_of(tmp_path: Path, events: dict | None = None, bank_1_state: Path | None = None) -> EventGrid:
    spec = write_federation(tmp_path / "data")
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(spec.banks))
    if bank_1_state is not None:
        nodes[1][protocol.NODE_STATE_DIR] = str(bank_1_state)
    return EventGrid(client_app, nodes, run_config, events=events or {})


def run(tmp_path: Path, grid: EventGrid, *overrides: str) -> History:
    spec = write_federation(tmp_path / "data")
    return run_federation(grid, config(*DP, *overrides), spec, tmp_path / "run")


def test_a_bank_whose_ledger_was_deleted_between_rounds_fails_the_round_and_never_starts_a_new_budget(tmp_path):
    deleted = bank_ledger(tmp_path, 1)
    grid = grid_of(tmp_path, events={3: deleted.unlink})
    history = run(tmp_path, grid, "federation.min_banks=2")

    reported = {r.round: r.metrics["epsilon"] for r in history.select("train", "bank_1")}
    recorded = reported[2]
    failed = history.select("train", status="failed")
    assert [(r.round, r.bank) for r in failed] == [(3, "bank_1")]
    assert f"bank bank_1: its privacy ledger {deleted} is missing" in failed[0].reason
    assert f"operator recorded epsilon {recorded:.4f} spent in 2 trained round(s)" in failed[0].reason
    assert f"copy the ledger back to {deleted}" in failed[0].reason
    assert not deleted.exists()
    assert {r.bank for r in history.select("train") if r.round == 3} == {"bank_0", "bank_2", FEDERATION}
    to_bank_1 = [m for m in grid.sent if m.metadata.dst_node_id == 2 and m.metadata.message_type == MessageType.TRAIN]
    # per node, its own bank only: nothing in round 1, then what it reported in rounds 1 and 2
    assert [sent_record(m) for m in to_bank_1] == [{}, *({"bank_1": SpentRecord(reported[n], n)} for n in (1, 2))]


def test_after_an_operator_restart_a_bank_with_another_state_folder_refuses_until_its_ledger_is_back(tmp_path):
    own, other = bank_ledger(tmp_path, 1), tmp_path / "other_state"
    backup = tmp_path / "backup.json"

    def crash() -> None:
        raise OperatorCrash("the ServerApp process dies")

    with pytest.raises(OperatorCrash):
        run(tmp_path, grid_of(tmp_path, events={2: lambda: shutil.copy(own, backup), 3: crash}))
    spent = PrivacyLedger.load(own).epsilon_spent()

    with pytest.raises(FederationRoundError, match=r"bank bank_1: its privacy ledger .* is missing") as refused:
        run(tmp_path, grid_of(tmp_path, bank_1_state=other), "federation.min_banks=3")
    assert f"copy the ledger back to {bank_ledger(tmp_path, 1, other)}" in str(refused.value)
    assert not bank_ledger(tmp_path, 1, other).exists()

    bank_ledger(tmp_path, 1, other).parent.mkdir(parents=True)
    shutil.copy(backup, bank_ledger(tmp_path, 1, other))  # an old copy: round 1 only
    with pytest.raises(FederationRoundError, match=rf"but the operator recorded {spent:.4f} spent in 2 trained"):
        run(tmp_path, grid_of(tmp_path, bank_1_state=other), "federation.min_banks=3")
    assert [r["round"] for r in PrivacyLedger.load(bank_ledger(tmp_path, 1, other)).rounds] == ["1"]

    history = run(tmp_path, grid_of(tmp_path), "federation.min_banks=3")  # its own state folder again
    ledger = PrivacyLedger.load(own)
    assert [r["round"] for r in ledger.rounds] == ["1", "2", "3"] and ledger.steps == 9
    third = next(r for r in history.select("train", "bank_1") if r.round == 3)
    assert third.metrics["epsilon"] == pytest.approx(ledger.epsilon_spent()) and ledger.epsilon_spent() > spent
