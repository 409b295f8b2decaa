"""Model state on the wire in one piece: each ArrayRecord of a message packed into one buffer.

Flower 1.41 moves a message as a tree of objects (the message, its RecordDict, each record, each
Array, each 5 MB chunk of an Array) and every object is its own request at every hop between the
ServerApp, the SuperLink, the SuperNode and the ClientApp. A state of 18 tensors makes a message of
about 26 objects against the 5 of a one-array message, and on a loopback deployment that alone cost
about 1 s a round (docs/benchmarks.md, deployment overhead). Packed, an ArrayRecord travels as one
Array (`PACKED`, stype `PACKED_STYPE`) whose bytes are

    magic b"FGPK" | format version (u16) | manifest length (u32) | manifest (UTF-8 JSON) | payload

where the manifest lists each original array as {name, dtype, shape, offset, nbytes} and the
payload holds their C-order bytes back to back, in manifest order. Config and metric records
stay as they are (one object each).

Where it happens: the ServerApp's grid (server/reply_poll.py) packs right before its messages
leave and unpacks the replies right after they arrive; the bank's ClientApp (client/app.py) unpacks
a message right after it arrives and packs its reply only when the message came packed. Strategies,
update checks, HE code and the bank's worker see the same records as before. An ArrayRecord that
would not come back byte for byte the same (an array that is not Flower's own numpy
serialisation of a C-order array of a plain dtype) is sent as it is, and so is one of a single array
(nothing to gain).

A packed record from the other side is hostile input: `unpack` checks the whole manifest before it
reads any payload (known array names, allowed dtypes, non-negative shapes, sizes that
add up exactly to the buffer, segments back to back without gaps or overlaps, limits on every
count and size) and raises `PackError` naming what is wrong. numpy only, no torch: the bank's thin
ClientApp imports this.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType

PACKED = "packed"
"""The name of the one array of a packed ArrayRecord."""
PACKED_STYPE = "fingpt.packed/1"
"""Its serialisation type: not numpy's, so code that expects a plain array fails loudly on it."""
MAGIC = b"FGPK"
VERSION = 1
PREFIX = struct.Struct(">4sHI")  # magic, version, manifest length
ALLOWED_DTYPES = frozenset(
    ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
)
ENTRY_KEYS = frozenset(("name", "dtype", "shape", "offset", "nbytes"))
MAX_MANIFEST_BYTES = 16 << 20
MAX_ARRAYS = 100_000
MAX_NAME_CHARS = 1_000
MAX_NDIM = 32
MAX_PAYLOAD_BYTES = 1 << 31  # Flower's own bound on one message part (protobuf)


class PackError(ValueError):
    """A packed record that must not be unpacked; the message says what is wrong with it."""


def pack(content: RecordDict) -> RecordDict:
    """`content` with every ArrayRecord of two or more arrays that round-trips exactly packed into one array."""
    packed = RecordDict()
    for name, record in content.items():
        packed[name] = _pack_record(record) if isinstance(record, ArrayRecord) else record
    return packed


def is_packed(content: RecordDict) -> bool:
    """Whether any ArrayRecord of `content` is packed."""
    return any(_packed_array(record) is not None for record in content.array_records.values())


def array_names(content: RecordDict) -> frozenset[str]:
    """The names of every array of `content`: the arrays a reply to it may carry.

    Any of them, in any record: a reply's records need not be the message's (SCAFFOLD sends its
    control variate as `scaffold-control` and gets the banks' changes back as `scaffold-update`).
    """
    return frozenset(name for record in content.array_records.values() for name in record)


def unpack(content: RecordDict, known: Collection[str] | None = None) -> RecordDict:
    """`content` with every packed ArrayRecord restored; PackError if one is malformed.

    With `known` (the array names of the message a reply answers, `array_names`), a packed record
    may hold only those arrays.
    """
    restored = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord) and (array := _packed_array(record)) is not None:
            if len(record) != 1 or PACKED not in record:
                raise PackError(f"record {name!r}: a packed record holds one array {PACKED!r}, got {sorted(record)}")
            try:
                record = _unpack_array(array, known)
            except PackError as exc:
                raise PackError(f"record {name!r}: {exc}") from None
        restored[name] = record
    return restored


def _packed_array(record: object) -> Array | None:
    if not isinstance(record, ArrayRecord):
        return None
    return next((array for array in record.values() if array.stype == PACKED_STYPE), None)


def _pack_record(record: ArrayRecord) -> ArrayRecord:
    if len(record) < 2:
        return record
    entries: list[dict[str, Any]] = []
    parts: list[bytes] = []
    offset = 0
    for name, array in record.items():
        raw = _raw_bytes(array)
        if raw is None:
            return record
        entries.append(
            {"name": name, "dtype": array.dtype, "shape": list(array.shape), "offset": offset, "nbytes": len(raw)}
        )
        parts.append(raw)
        offset += len(raw)
    manifest = json.dumps({"arrays": entries}, separators=(",", ":")).encode()
    data = b"".join([PREFIX.pack(MAGIC, VERSION, len(manifest)), manifest, *parts])
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def _raw_bytes(array: Array) -> bytes | None:
    """The array's C-order bytes when rebuilding it from them gives back exactly `array`; else None."""
    if array.stype != SType.NUMPY or array.dtype not in ALLOWED_DTYPES:
        return None
    values = array.numpy()
    if str(values.dtype) != array.dtype or tuple(values.shape) != tuple(array.shape):
        return None
    values = values if values.flags.c_contiguous else values.copy(order="C")  # what `unpack` rebuilds
    if _npy(values) != array.data:  # e.g. a Fortran-order array: its rebuilt bytes (and hash) would differ
        return None
    return values.tobytes()


def _npy(values: np.ndarray) -> bytes:
    """Flower's serialisation of a numpy array (Array.from_numpy_ndarray): `np.save` without pickle."""
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _unpack_array(array: Array, known: Collection[str] | None) -> ArrayRecord:
    data = array.data
    if array.dtype != "uint8" or tuple(array.shape) != (len(data),):
        raise PackError(
            f"the packed array must be uint8 of shape ({len(data)},), got {array.dtype} {tuple(array.shape)}"
        )
    if len(data) < PREFIX.size:
        raise PackError(f"packed buffer of {len(data)} bytes is shorter than its {PREFIX.size}-byte prefix")
    magic, version, manifest_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise PackError(f"not a packed buffer (magic {magic!r})")
    if version != VERSION:
        raise PackError(f"packed format version {version}, this side reads {VERSION}")
    if manifest_len > MAX_MANIFEST_BYTES:
        raise PackError(f"manifest of {manifest_len} bytes exceeds the limit of {MAX_MANIFEST_BYTES}")
    start = PREFIX.size + manifest_len
    if start > len(data):
        raise PackError(f"manifest of {manifest_len} bytes runs past the end of the {len(data)}-byte buffer")
    payload = memoryview(data)[start:]
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PackError(f"payload of {len(payload)} bytes exceeds the limit of {MAX_PAYLOAD_BYTES}")
    entries = _manifest(bytes(data[PREFIX.size : start]))
    _check_entries(entries, len(payload), known)
    arrays = {}
    for entry in entries:
        values = np.frombuffer(
            payload, dtype=np.dtype(entry["dtype"]), count=math.prod(entry["shape"]), offset=entry["offset"]
        )
        arrays[entry["name"]] = Array(values.reshape(entry["shape"]))
    return ArrayRecord(arrays)


def _manifest(text: bytes) -> list[dict[str, Any]]:
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackError(f"manifest is not UTF-8 JSON: {exc}") from None
    if not isinstance(manifest, dict) or set(manifest) != {"arrays"}:
        raise PackError("manifest must be a JSON object with exactly the key 'arrays'")
    entries = manifest["arrays"]
    if not isinstance(entries, list) or not entries:
        raise PackError("manifest 'arrays' must be a non-empty list")
    if len(entries) > MAX_ARRAYS:
        raise PackError(f"manifest lists {len(entries)} arrays, the limit is {MAX_ARRAYS}")
    return entries


def _check_entries(entries: list[Any], payload_bytes: int, known: Collection[str] | None) -> None:
    """Every entry well formed, and together they tile the payload exactly; PackError naming the first fault."""
    seen: set[str] = set()
    end = 0
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
            raise PackError(f"manifest entry {index} must be an object with exactly the keys {sorted(ENTRY_KEYS)}")
        name = entry["name"]
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            raise PackError(f"manifest entry {index}: the name must be a string of 1 to {MAX_NAME_CHARS} characters")
        if name in seen:
            raise PackError(f"array {name!r} is listed twice")
        seen.add(name)
        if known is not None and name not in known:
            raise PackError(f"array {name!r} is not one of the arrays the message it answers carried")
        if entry["dtype"] not in ALLOWED_DTYPES:
            raise PackError(f"array {name!r}: dtype {entry['dtype']!r} is not one of {sorted(ALLOWED_DTYPES)}")
        shape = entry["shape"]
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise PackError(
                f"array {name!r}: shape {shape!r} must be a list of at most {MAX_NDIM} non-negative integers"
            )
        if math.prod(max(d, 1) for d in shape) > MAX_PAYLOAD_BYTES:
            raise PackError(f"array {name!r}: shape {shape} is larger than the limit of {MAX_PAYLOAD_BYTES} values")
        offset, nbytes = entry["offset"], entry["nbytes"]
        for key, value in (("offset", offset), ("nbytes", nbytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PackError(f"array {name!r}: {key} {value!r} must be a non-negative integer")
        needed = math.prod(shape) * np.dtype(entry["dtype"]).itemsize
        if nbytes != needed:
            raise PackError(
                f"array {name!r}: shape {shape} of {entry['dtype']} needs {needed} bytes, the manifest says {nbytes}"
            )
        if offset != end:
            raise PackError(
                f"array {name!r} starts at byte {offset} of the payload, expected {end}: "
                f"arrays must follow each other without {'gaps' if offset > end else 'overlaps'}"
            )
        end = offset + nbytes
        if end > payload_bytes:
            raise PackError(f"array {name!r} ends at byte {end}, past the payload's {payload_bytes} bytes")
    if end != payload_bytes:
        raise PackError(
            f"the arrays fill {end} bytes of a {payload_bytes}-byte payload: {payload_bytes - end} bytes left over"
        )
