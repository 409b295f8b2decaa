"""Model state packed for the wire (federation/wire_pack.py): real records come back byte for byte,
a packed message is a handful of Flower objects, and every kind of malformed packed record is
refused naming what is wrong, also as a bank's reply through the ServerApp's grid (server/reply_poll.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from federation_helpers import PushPullGrid, config, server_identity
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fingpt_federated.config_dicts import config_dict
from fingpt_federated.federation import protocol, wire_pack
from fingpt_federated.federation.wire_pack import PACKED, PREFIX, PackError
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state
from fingpt_federated.server.replies import check_reply
from fingpt_federated.server.reply_poll import PollingGrid


@pytest.fixture(scope="module")
def state_record() -> ArrayRecord:
    """The tiny encoder's federated state as the ServerApp sends it (18 tensors)."""
    model, _ = build_model(config_dict(config().model), 3, 2)
    return protocol.state_to_record(federated_state(model))


def mixed_record() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "w": Array(rng.standard_normal((4, 3)).astype(np.float32)),
            "b": Array(rng.standard_normal(5)),  # float64
            "steps": Array(np.array(7, dtype=np.int64)),  # a 0-d array
            "mask": Array(np.array([True, False, True])),
            "empty": Array(np.zeros((0, 4), dtype=np.float16)),
            "codes": Array(np.arange(6, dtype=np.uint8).reshape(2, 3)),
        }
    )


def same_arrays(left: ArrayRecord, right: ArrayRecord) -> bool:
    fields = lambda a: (a.dtype, tuple(a.shape), a.stype, a.data)  # noqa: E731
    return list(left) == list(right) and all(fields(left[n]) == fields(right[n]) for n in left)


def content_of(arrays: ArrayRecord) -> RecordDict:
    return RecordDict(
        {
            protocol.ARRAYS: arrays,
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 3, "blob": b"\x00\x01"}),
            protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 60}),
        }
    )


def test_a_real_state_comes_back_byte_for_byte_with_the_same_hash_and_config_untouched(state_record):
    content = content_of(state_record)
    packed = wire_pack.pack(content)
    assert wire_pack.is_packed(packed) and list(packed[protocol.ARRAYS]) == [PACKED]
    assert packed[protocol.CONFIG] is content[protocol.CONFIG] and packed[protocol.METRICS] is content[protocol.METRICS]
    restored = wire_pack.unpack(packed, wire_pack.array_names(content))
    assert same_arrays(restored[protocol.ARRAYS], state_record)
    assert protocol.record_hash(restored[protocol.ARRAYS]) == protocol.record_hash(state_record)
    assert list(restored) == list(content) and restored[protocol.CONFIG] is content[protocol.CONFIG]


def test_every_allowed_kind_of_array_round_trips():
    record = mixed_record()
    restored = wire_pack.unpack(wire_pack.pack(RecordDict({"a": record})))["a"]
    assert same_arrays(restored, record)
    assert restored["steps"].numpy().shape == () and restored["empty"].numpy().shape == (0, 4)


def test_a_packed_message_is_a_handful_of_flower_objects(state_record):
    server_identity()
    objects = lambda content: len(get_all_nested_objects(Message(content, dst_node_id=1, message_type="train")))  # noqa: E731
    content = content_of(state_record)
    assert objects(content) >= 25  # one Array and one chunk per tensor: each its own request at each hop
    assert objects(wire_pack.pack(content)) == 7  # message, RecordDict, 3 records, the packed Array, its chunk


def test_what_would_not_come_back_identical_is_sent_as_it_is():
    single = ArrayRecord({"only": Array(np.ones(3, dtype=np.float32))})  # nothing to gain
    fortran = ArrayRecord({"f": Array(np.asfortranarray(np.ones((3, 2)))), "g": Array(np.ones(2))})  # npy differs
    odd = ArrayRecord({"c": Array(np.ones(2, dtype=np.complex64)), "g": Array(np.ones(2))})  # dtype not allowed
    for record in (single, fortran, odd):
        packed = wire_pack.pack(RecordDict({"a": record}))
        assert packed["a"] is record and not wire_pack.is_packed(packed)
        assert wire_pack.unpack(packed)["a"] is record


# --- hostile packed records -------------------------------------------------------------------


def packed_parts(record: ArrayRecord) -> tuple[dict, bytes]:
    """The manifest and payload of `record` packed."""
    data = wire_pack.pack(RecordDict({"a": record}))["a"][PACKED].data
    _, _, length = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size : PREFIX.size + length]), data[PREFIX.size + length :]


def packed_record(manifest: object, payload: bytes, prefix: tuple | None = None) -> ArrayRecord:
    text = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    magic, version, length = prefix or (wire_pack.MAGIC, wire_pack.VERSION, len(text))
    data = PREFIX.pack(magic, version, length) + text + payload
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=wire_pack.PACKED_STYPE, data=data)})


Tamper = Callable[[dict, bytes], tuple[object, bytes]]


def entry(manifest: dict, name: str) -> dict:
    return next(e for e in manifest["arrays"] if e["name"] == name)


def edit(array: str, **changes: object) -> Tamper:
    def tamper(manifest: dict, payload: bytes) -> tuple[object, bytes]:
        entry(manifest, array).update(changes)
        return manifest, payload

    return tamper


def drop_key(key: str) -> Tamper:
    def tamper(manifest: dict, payload: bytes) -> tuple[object, bytes]:
        del manifest["arrays"][0][key]
        return manifest, payload

    return tamper


CASES: dict[str, tuple[Tamper, str]] = {
    "not JSON": (lambda m, p: (b"{not json", p), "manifest is not UTF-8 JSON"),
    "not an object": (lambda m, p: (m["arrays"], p), "manifest must be a JSON object with exactly the key 'arrays'"),
    "an extra key": (lambda m, p: ({**m, "x": 1}, p), "exactly the key 'arrays'"),
    "no arrays": (lambda m, p: ({"arrays": []}, b""), "manifest 'arrays' must be a non-empty list"),
    "too many arrays": (
        lambda m, p: ({"arrays": [0] * (wire_pack.MAX_ARRAYS + 1)}, p),
        f"manifest lists {wire_pack.MAX_ARRAYS + 1} arrays, the limit is {wire_pack.MAX_ARRAYS}",
    ),
    "an entry that is not an object": (lambda m, p: ({"arrays": [1]}, p), "manifest entry 0 must be an object"),
    "a missing key": (drop_key("offset"), "manifest entry 0 must be an object with exactly the keys"),
    "an extra entry key": (edit("w", extra=1), "manifest entry 0 must be an object with exactly the keys"),
    "a name that is not a string": (edit("w", name=5), "manifest entry 0: the name must be a string"),
    "an empty name": (edit("w", name=""), "manifest entry 0: the name must be a string of 1 to"),
    "a name too long": (edit("w", name="x" * 1001), "the name must be a string of 1 to 1000 characters"),
    "a name twice": (edit("b", name="w"), "array 'w' is listed twice"),
    "an unknown name": (edit("w", name="head.weight"), "array 'head.weight' is not one of the arrays"),
    "a pickled dtype": (edit("w", dtype="object"), "array 'w': dtype 'object' is not one of"),
    "a big-endian dtype": (edit("w", dtype=">f4"), "array 'w': dtype '>f4' is not one of"),
    "a negative dimension": (edit("w", shape=[-4, -3]), "array 'w': shape [-4, -3] must be a list of at most 32"),
    "a shape that is not a list": (edit("w", shape=12), "array 'w': shape 12 must be a list"),
    "a boolean dimension": (edit("w", shape=[True, 12]), "array 'w': shape [True, 12] must be a list"),
    "too many dimensions": (edit("w", shape=[1] * 33), "must be a list of at most 32 non-negative integers"),
    "a shape beyond every limit": (
        edit("w", shape=[0, 1 << 40, 1 << 40]),
        "array 'w': shape [0, 1099511627776, 1099511627776] is larger than the limit",
    ),
    "a size that does not match the shape": (
        edit("w", shape=[4, 4]),
        "array 'w': shape [4, 4] of float32 needs 64 bytes, the manifest says 48",
    ),
    "a negative offset": (edit("w", offset=-8), "array 'w': offset -8 must be a non-negative integer"),
    "a size that is not an integer": (edit("w", nbytes=48.0), "array 'w': nbytes 48.0 must be a non-negative integer"),
    "a gap": (
        edit("b", offset=56),
        "array 'b' starts at byte 56 of the payload, expected 48: arrays must follow each ",
    ),
    "an overlap": (edit("b", offset=40), "array 'b' starts at byte 40 of the payload, expected 48: arrays must follow"),
    "bytes left over": (
        lambda m, p: (m, p + b"\x00" * 8),
        "the arrays fill 105 bytes of a 113-byte payload: 8 bytes left over",
    ),
    "a payload too short": (lambda m, p: (m, p[:-1]), "array 'codes' ends at byte 105, past the payload's 104 bytes"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_kind_of_bad_manifest_is_refused_naming_what_is_wrong(case):
    tamper, expected = CASES[case]
    manifest, payload = packed_parts(mixed_record())
    record = packed_record(*tamper(manifest, payload))
    with pytest.raises(PackError, match="^record 'a': ") as refused:
        wire_pack.unpack(RecordDict({"a": record}), set(mixed_record()))
    assert expected in str(refused.value)


def test_a_bad_prefix_or_container_is_refused():
    manifest, payload = packed_parts(mixed_record())
    known = set(mixed_record())
    text = json.dumps(manifest).encode()
    bad = {
        "not a packed buffer (magic b'XXXX')": packed_record(manifest, payload, (b"XXXX", 1, len(text))),
        "packed format version 2, this side reads 1": packed_record(manifest, payload, (wire_pack.MAGIC, 2, len(text))),
        "manifest of 99999 bytes runs past the end": packed_record(manifest, payload, (wire_pack.MAGIC, 1, 99_999)),
        "exceeds the limit of 16777216": packed_record(manifest, payload, (wire_pack.MAGIC, 1, (16 << 20) + 1)),
    }
    short = Array(dtype="uint8", shape=(3,), stype=wire_pack.PACKED_STYPE, data=b"FGP")
    bad["packed buffer of 3 bytes is shorter than its 10-byte prefix"] = ArrayRecord({PACKED: short})
    liar = Array(dtype="uint8", shape=(5,), stype=wire_pack.PACKED_STYPE, data=b"FGPK")
    bad["the packed array must be uint8 of shape (4,), got uint8 (5,)"] = ArrayRecord({PACKED: liar})
    extra = packed_record(manifest, payload)
    extra["w"] = Array(np.ones(2))
    bad["a packed record holds one array 'packed', got ['packed', 'w']"] = extra
    for expected, record in bad.items():
        with pytest.raises(PackError, match="^record 'a': ") as refused:
            wire_pack.unpack(RecordDict({"a": record}), known)
        assert expected in str(refused.value), (expected, str(refused.value))


# --- through the ServerApp's grid ---------------------------------------------------------------


class EchoGrid(PushPullGrid):
    """A stand-in SuperLink whose bank answers each message at once with `answer(message as pushed)`."""

    def __init__(self, answer: Callable[[Message], RecordDict]) -> None:
        self.answer = answer
        self.pushed: list[Message] = []
        self.pending: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return [1]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for number, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"m{number}"
            self.pushed.append(message)
            self.pending[f"m{number}"] = message
            ids.append(f"m{number}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in list(message_ids):
            message = self.pending.pop(message_id)
            replies.append(self.reply(message, self.answer(message)))
        return replies


def train_message(arrays: ArrayRecord) -> Message:
    server_identity()
    return Message(content_of(arrays), dst_node_id=1, message_type=MessageType.TRAIN, group_id="3")


def test_the_grid_sends_packed_and_hands_the_strategy_the_reply_unpacked(state_record):
    def bank(message: Message) -> RecordDict:  # an honest bank: its state back, packed as it came
        assert list(message.content[protocol.ARRAYS]) == [PACKED]
        received = wire_pack.unpack(message.content)[protocol.ARRAYS]
        # A reply may carry the message's arrays in another record (SCAFFOLD's control variate change)
        reply = {protocol.ARRAYS: received, protocol.CONTROL_UPDATE: received, "bank": ConfigRecord({"x": 1})}
        return wire_pack.pack(RecordDict(reply))

    sent = train_message(state_record)
    (reply,) = PollingGrid(EchoGrid(bank)).send_and_receive([sent], timeout=5)
    assert reply.metadata.src_node_id == 1
    assert same_arrays(reply.content[protocol.ARRAYS], state_record)
    assert same_arrays(reply.content[protocol.CONTROL_UPDATE], state_record)
    assert same_arrays(sent.content[protocol.ARRAYS], state_record)  # the strategy's message is not changed


def test_a_bank_whose_packed_reply_is_malformed_fails_the_round_with_one_clear_reason(state_record):
    def hostile(message: Message) -> RecordDict:
        manifest, payload = packed_parts(state_record)
        manifest["arrays"][0]["shape"] = [10**6]
        return RecordDict({protocol.ARRAYS: packed_record(manifest, payload)})

    started = time.monotonic()
    (reply,) = PollingGrid(EchoGrid(hostile)).send_and_receive([train_message(state_record)], timeout=5)
    assert time.monotonic() - started < 1.0
    problem, receipt = check_reply(reply, 3, "")
    first = next(iter(state_record))
    assert receipt is None and problem.startswith(
        f"packed reply refused: record 'arrays': array '{first}': shape [1000000]"
    )
    assert "\n" not in problem
