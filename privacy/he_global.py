"""The encrypted global model: a public starting point plus an encrypted mean of the drift from it.

BFV or CKKS with the add-only parameters of he.yaml cannot divide a ciphertext by the total weight
(that would need a multiplication and a rescale, i.e. a second data modulus and bigger
ciphertexts), so the operator cannot fold a round's mean into an encrypted global state. The
global model is therefore kept as

    global_t = initial + mean_t,   mean_t = sum_i n_i * (local_i - initial) / sum_i n_i

over the banks that trained in round t. `initial` is the model every bank builds from the run's
model config (deterministic in `model.seed`, checked against a hash the operator announces) and
holds no bank data; the operator holds `mean_t` only as one encrypted aggregate (sum and total
weight). Since every local model of round t started from global_{t-1}, `initial + mean_t` is
exactly FedAvg of round t's local models, partial participation included: a bank that skipped
rounds receives the latest aggregate and decrypts the current global like any other.

Encrypting the drift from `initial` rather than whole states keeps the encrypted values small
(LoRA B and drifts of the other tensors, not whole weights), which is what the per-bank overflow
bound of `encrypt_update` (|examples * value| <= update_bound) is about.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fingpt_federated.privacy.he_context import HEContext
from fingpt_federated.privacy.he_packing import (
    decrypt_mean,
    encrypt_update_counting,
    flatten,
    schema_of,
    unflatten,
)


def encrypt_drift(
    local: Mapping[str, Any],
    initial: Mapping[str, Any],
    weight: float,
    he: HEContext,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encrypt `weight * (local - initial)`, tensors in the order of `initial`."""
    return encrypt_drift_counting(local, initial, weight, he, rng)[0]


def encrypt_drift_counting(
    local: Mapping[str, Any],
    initial: Mapping[str, Any],
    weight: float,
    he: HEContext,
    rng: np.random.Generator | None = None,
) -> tuple[bytes, int]:
    """`encrypt_drift`, and how many values BFV clipped to its bound."""
    if list(local) != list(initial):
        raise ValueError("the local state and the initial state list different tensors (or orders)")
    drift = unflatten(flatten(local) - flatten(initial), schema_of(initial), np.float64)
    return encrypt_update_counting(drift, weight, he, rng)


def decrypt_global(initial: Mapping[str, Any], aggregate: bytes | None, he: HEContext) -> OrderedDict[str, np.ndarray]:
    """The global state: `initial` plus the decrypted (rounded) mean drift; `initial` itself before
    any round has been aggregated. float32 arrays, in the order of `initial`."""
    schema = schema_of(initial)
    start = flatten(initial)
    if aggregate is None:
        return unflatten(start, schema)
    mean = decrypt_mean(aggregate, he, schema, dtype=np.float64)
    return unflatten(start + flatten(mean), schema)


def round_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), returned as float32.

    What a key-holding bank hands over for publishing: 8 significant bits leave nothing of the
    CKKS decryption noise (~2^-25 here) in what leaves the bank (BFV decryptions hold no noise).
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)
