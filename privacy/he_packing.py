"""A bank's update as BFV or CKKS ciphertexts: flatten, weight, pack, encrypt; and the way back.

All federated tensors are flattened in their canonical order into ONE vector, multiplied by
the bank's example count (so that the operator's plain sum of ciphertexts is the numerator of
FedAvg) and cut into chunks of `slots` values (BFV: N, CKKS: N/2), one ciphertext each, packing
across tensor borders. BFV first clips and quantizes the weighted vector to integers with
stochastic rounding (privacy/bfv_quantize.py); its sums are exact, so its decrypted mean is the
integer sum times the step over the total weight, with no encryption noise to round away.

An encrypted update travels as one blob:

    magic "FGHE" | version u8 | ceremony fingerprint 32B | schema digest 32B | num_params u64
    | weight f64 | summands u32 | num_chunks u32 | num_chunks x (u32 length | TenSEAL CKKSVector)

The header is public metadata (which ceremony, which model layout, how many parameters, the
example count that Flower reports in plaintext anyway, and how many updates a sum holds);
everything after it is ciphertext. Aggregates use the same layout with the summed weight.

CKKS decryption divides by the total weight and rounds to a grid of 2^-round_bits before any value
leaves the function: exact CKKS decryptions carry the encryption noise, and handing those out
can leak the secret key (Li-Micciancio, IND-CPA-D). The grid sits several bits above the noise
of the chosen parameters, so rounding removes it except for values that fall near a grid edge.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts

from fingpt_federated.privacy import bfv_quantize
from fingpt_federated.privacy.he_context import ContextMismatchError, HEContext

Schema = tuple[tuple[str, tuple[int, ...]], ...]
"""Names and shapes of the federated tensors, in the canonical order they are packed in."""

_MAGIC = b"FGHE"
_VERSION = 1
_HEADER = struct.Struct("<4sB32s32sQdII")
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class EncryptedUpdate:
    """The parsed form of an encrypted update or aggregate blob."""

    fingerprint: bytes
    schema_digest: bytes
    num_params: int
    weight: float
    summands: int
    chunks: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            self.fingerprint,
            self.schema_digest,
            self.num_params,
            self.weight,
            self.summands,
            len(self.chunks),
        )
        parts = [header]
        for chunk in self.chunks:
            parts.append(_LENGTH.pack(len(chunk)))
            parts.append(chunk)
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> EncryptedUpdate:
        if len(blob) < _HEADER.size:
            raise ValueError("malformed encrypted update: shorter than its header")
        magic, version, fingerprint, digest, num_params, weight, summands, count = _HEADER.unpack_from(blob)
        if magic != _MAGIC or version != _VERSION:
            raise ValueError(f"not an encrypted update of format {_MAGIC.decode()} v{_VERSION}")
        chunks = []
        offset = _HEADER.size
        for _ in range(count):
            if offset + _LENGTH.size > len(blob):
                raise ValueError("malformed encrypted update: truncated chunk table")
            (length,) = _LENGTH.unpack_from(blob, offset)
            offset += _LENGTH.size
            if offset + length > len(blob):
                raise ValueError("malformed encrypted update: truncated ciphertext")
            chunks.append(bytes(blob[offset : offset + length]))
            offset += length
        if offset != len(blob):
            raise ValueError("malformed encrypted update: trailing bytes")
        return cls(fingerprint, digest, num_params, weight, summands, tuple(chunks))

    def check_context(self, he: HEContext, what: str = "encrypted update") -> None:
        """Refuse an update from another key ceremony, or one cut for other parameters."""
        if self.fingerprint.hex() != he.fingerprint:
            raise ContextMismatchError(
                f"{what} was encrypted under HE context {self.fingerprint.hex()[:16]}... but this context is "
                f"{he.fingerprint[:16]}...: it comes from another key ceremony"
            )
        expected = math.ceil(self.num_params / he.params.slots)
        if len(self.chunks) != expected:
            raise ValueError(
                f"{what} has {len(self.chunks)} ciphertexts where {self.num_params} values need {expected}"
            )


def schema_of(state: Mapping[str, Any]) -> Schema:
    """The schema of an ordered mapping of arrays (its iteration order is the packing order)."""
    return tuple((name, tuple(int(size) for size in _as_numpy(value).shape)) for name, value in state.items())


def schema_digest(schema: Schema) -> bytes:
    """sha256 over names and shapes in order: equal digests mean the same packing layout."""
    canonical = json.dumps([[name, list(shape)] for name, shape in schema], separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).digest()


def flatten(state: Mapping[str, Any]) -> np.ndarray:
    """One float64 vector holding every tensor of `state`, in order."""
    parts = [_as_numpy(value).reshape(-1) for value in state.values()]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten(vector: np.ndarray, schema: Schema, dtype: np.dtype | type = np.float32) -> OrderedDict[str, np.ndarray]:
    """Cut `vector` back into named arrays of the schema's shapes."""
    sizes = [math.prod(shape) for _, shape in schema]
    if sum(sizes) != vector.size:
        raise ValueError(f"vector of {vector.size} values does not fit a schema of {sum(sizes)}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for (name, shape), size in zip(schema, sizes, strict=True):
        out[name] = vector[offset : offset + size].reshape(shape).astype(dtype)
        offset += size
    return out


def round_to_grid(values: np.ndarray, bits: int) -> np.ndarray:
    """Round to the nearest multiple of 2^-bits (exact in float64 for |values| < 2^(52-bits)).

    Adding 0.0 turns the -0.0 of tiny negative values into 0.0, so no sign bit of noise survives.
    """
    return np.ldexp(np.rint(np.ldexp(values, bits)), -bits) + 0.0


def encrypt_update(
    state: Mapping[str, Any], weight: float, he: HEContext, rng: np.random.Generator | None = None
) -> bytes:
    """Encrypt `weight * state` (weight: the bank's example count) into one update blob.

    The aggregate must not overflow: each scheme wraps around silently. CKKS refuses weighted
    values above `update_bound`, which leaves room for a sum of `max_summands` updates; BFV clips
    them to its `quantization_bound` (whose sums `HEParams` checked cannot wrap) and rounds them
    stochastically with `rng` (default: seeded by the OS). `encrypt_update_counting` also says how
    many values BFV clipped.
    """
    return encrypt_update_counting(state, weight, he, rng)[0]


def encrypt_update_counting(
    state: Mapping[str, Any], weight: float, he: HEContext, rng: np.random.Generator | None = None
) -> tuple[bytes, int]:
    """`encrypt_update`, and how many values were clipped to the BFV bound (always 0 with CKKS)."""
    if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"weight must be a positive example count, got {weight}")
    weighted = flatten(state) * weight
    if weighted.size == 0:
        raise ValueError("nothing to encrypt: the state is empty")
    if not np.all(np.isfinite(weighted)):
        raise ValueError("the update holds NaN or infinite values")
    params, clipped = he.params, 0
    slots = params.slots
    if params.scheme == "bfv":
        integers, clipped = bfv_quantize.quantize(weighted, params, rng or bfv_quantize.new_rng())
        chunks = tuple(
            ts.bfv_vector(he.context, integers[start : start + slots].tolist()).serialize()
            for start in range(0, integers.size, slots)
        )
    else:
        _check_ckks_bound(weighted, he)
        chunks = tuple(
            ts.ckks_vector(he.context, weighted[start : start + slots].tolist()).serialize()
            for start in range(0, weighted.size, slots)
        )
    update = EncryptedUpdate(
        fingerprint=bytes.fromhex(he.fingerprint),
        schema_digest=schema_digest(schema_of(state)),
        num_params=weighted.size,
        weight=float(weight),
        summands=1,
        chunks=chunks,
    )
    return update.to_bytes(), clipped


def _check_ckks_bound(weighted: np.ndarray, he: HEContext) -> None:
    largest = float(np.max(np.abs(weighted)))
    if largest > he.params.update_bound:
        raise ValueError(
            f"weighted update reaches {largest:.3g}, above the {he.params.update_bound:.3g} that lets "
            f"{he.params.max_summands} updates add up without overflow; use more modulus bits, "
            "a smaller global_scale_bits or fewer max_summands"
        )


def load_vector(he: HEContext, chunk: bytes) -> ts.CKKSVector | ts.BFVVector:
    """One serialized ciphertext of this context's scheme."""
    if he.params.scheme == "bfv":
        return ts.bfv_vector_from(he.context, chunk)
    return ts.ckks_vector_from(he.context, chunk)


def decrypt_sum(blob: bytes, he: HEContext, schema: Schema) -> tuple[np.ndarray, EncryptedUpdate]:
    """The decrypted weighted sum (float64, weighted unit; BFV: exact integers times the step) and its header."""
    if not he.holds_secret_key:
        raise ValueError("cannot decrypt: this HE context holds no secret key (it is the operator's public context)")
    update = EncryptedUpdate.from_bytes(blob)
    update.check_context(he)
    if update.schema_digest != schema_digest(schema):
        raise ValueError("the encrypted update was packed for another model layout (schema digest differs)")
    total = np.concatenate([np.asarray(load_vector(he, chunk).decrypt()) for chunk in update.chunks])
    if total.size != update.num_params:
        raise ValueError(f"ciphertexts hold {total.size} values, the header says {update.num_params}")
    if he.params.scheme == "bfv":
        return bfv_quantize.dequantize(total, he.params), update
    return total.astype(np.float64), update


def decrypt_mean(
    blob: bytes, he: HEContext, schema: Schema, dtype: np.dtype | type = np.float32
) -> OrderedDict[str, np.ndarray]:
    """Decrypt an aggregate (or one update) into the weighted mean as named arrays (CKKS: rounded
    to the 2^-round_bits grid; BFV needs no rounding: its decryption is exact)."""
    total, update = decrypt_sum(blob, he, schema)
    mean = total / update.weight
    if he.params.scheme == "ckks":
        mean = round_to_grid(mean, he.params.round_bits)
    return unflatten(mean, schema, dtype)


def _as_numpy(value: Any) -> np.ndarray:
    """numpy or torch (any dtype, any device) to a float64 numpy array, without importing torch."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
