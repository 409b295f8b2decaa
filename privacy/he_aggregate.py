"""The operator's only homomorphic operation: add encrypted updates, never decrypt them.

Addition (BFV or CKKS) needs no key at all, so the operator runs this with the public context and
refuses a secret one: holding the key would let it read every bank's update. The result is an
encrypted update blob of the same layout whose weight is the sum of the participants' example
counts, so the banks' decryption divides by exactly the weight of whoever took part (partial
participation needs nothing special). Sums can be summed again, up to `max_summands` updates.
"""

from __future__ import annotations

from collections.abc import Sequence

import tenseal as ts

from fingpt_federated.privacy.he_context import HEContext, SecretKeyRefused
from fingpt_federated.privacy.he_packing import EncryptedUpdate, load_vector


def aggregate(blobs: Sequence[bytes], he: HEContext) -> bytes:
    """Sum encrypted updates (or aggregates) into one encrypted aggregate blob.

    Every update is checked against the operator's context (same ceremony, same parameters)
    and against the first one (same layout) before any ciphertext is added. The total weight
    is in the result's header: `EncryptedUpdate.from_bytes(result).weight`.
    """
    if he.holds_secret_key:
        raise SecretKeyRefused(
            "aggregation runs on the operator's public context; refusing a context with a secret key"
        )
    if not blobs:
        raise ValueError("nothing to aggregate: no encrypted updates")
    updates = [EncryptedUpdate.from_bytes(blob) for blob in blobs]
    first = updates[0]
    for index, update in enumerate(updates):
        update.check_context(he, what=f"encrypted update #{index}")
        if (update.schema_digest, update.num_params) != (first.schema_digest, first.num_params):
            raise ValueError(f"encrypted update #{index} was packed for another model layout than update #0")
        if update.weight <= 0:
            raise ValueError(f"encrypted update #{index} has a non-positive weight {update.weight}")
    summands = sum(update.summands for update in updates)
    if summands > he.params.max_summands:
        raise ValueError(
            f"an aggregate of {summands} updates exceeds max_summands={he.params.max_summands}, "
            "beyond which the banks' overflow check no longer holds"
        )
    chunks = tuple(_sum_chunk(updates, position, he) for position in range(len(first.chunks)))
    result = EncryptedUpdate(
        fingerprint=first.fingerprint,
        schema_digest=first.schema_digest,
        num_params=first.num_params,
        weight=sum(update.weight for update in updates),
        summands=summands,
        chunks=chunks,
    )
    return result.to_bytes()


def _sum_chunk(updates: Sequence[EncryptedUpdate], position: int, he: HEContext) -> bytes:
    """Add the `position`-th ciphertext of every update (one chunk in memory at a time)."""
    expected_size = min(he.params.slots, updates[0].num_params - position * he.params.slots)
    total = _load_chunk(updates[0], 0, position, expected_size, he)
    for index, update in enumerate(updates[1:], start=1):
        vector = _load_chunk(update, index, position, expected_size, he)
        try:
            total.add_(vector)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"encrypted update #{index}, ciphertext {position}: cannot be added ({error})") from None
    return total.serialize()


def _load_chunk(
    update: EncryptedUpdate, index: int, position: int, size: int, he: HEContext
) -> ts.CKKSVector | ts.BFVVector:
    try:
        vector = load_vector(he, update.chunks[position])
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"encrypted update #{index}, ciphertext {position}: unreadable ({error})") from None
    if vector.size() != size:
        raise ValueError(
            f"encrypted update #{index}, ciphertext {position}: holds {vector.size()} slots, expected {size}"
        )
    return vector
