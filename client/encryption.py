"""The bank's side of an encrypted round: decrypt the global state it receives, encrypt what it sends.

A bank finds its key material in its node config (`he-context`: the federation's SECRET context,
`he-binding-key`: its update-binding MAC key) or, for a simulated bank, in its FederationSpec
entry. The secret context must come from the ceremony whose fingerprint the round config
announces; another ceremony's context is refused with `ContextMismatchError`.

What leaves the bank in a train reply is one ConfigRecord: the ciphertext of
`examples * (local - initial)` (privacy/he_global.py; BFV clips and quantizes it first and the
bank logs how many values were clipped), its binding (run, round, bank name, the bank's Flower
node id, hash of the global state it trained from, hash of the ciphertext) and the HMAC tag over
that binding.
No plaintext array of the state is sent.

The operator cannot look inside a ciphertext, so every bank checks the global state it decrypts
before it trains on it (`check_aggregate`): all values finite, and the mean drift within the
ceremony's per-value bound, which no honest aggregate exceeds (each bank keeps |examples * value|
within `update_bound`, so their weighted mean does too). A failed check raises `AggregateRefused`:
every bank fails the round and the run stops loudly. An update scaled or flipped within that bound
is out of the banks' reach, as it is out of the operator's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from logging import WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log

from fingpt_federated.federation import protocol
from fingpt_federated.federation.federation_spec import BankSite
from fingpt_federated.federation.protocol import RoundTask
from fingpt_federated.privacy.he_context import (
    ContextMismatchError,
    HEContext,
    load_secret_context,
)
from fingpt_federated.privacy.he_global import decrypt_global, encrypt_drift_counting
from fingpt_federated.privacy.he_packing import flatten
from fingpt_federated.privacy.update_binding import (
    UpdateBinding,
    read_mac_key,
    tag_update,
)


class AggregateRefused(ValueError):
    """The decrypted global aggregate fails the bank's check: the bank does not train on it."""


@dataclass(frozen=True)
class BankSecrets:
    context: Path
    binding_key: Path


def bank_secrets(site: BankSite, context: Context) -> BankSecrets:
    """Node config first (a deployed bank), then the bank's entry in the run's FederationSpec."""
    node = context.node_config
    secret = str(node.get(protocol.NODE_HE_CONTEXT, "") or site.he_context)
    key = str(node.get(protocol.NODE_BINDING_KEY, "") or site.binding_key)
    if not secret or not key:
        raise ValueError(
            f"bank {site.name}: the round is encrypted but this node has no `{protocol.NODE_HE_CONTEXT}` "
            f"(the federation's he_secret.ctx) and `{protocol.NODE_BINDING_KEY}` (its update-binding key) "
            "in its node config: fingpt-client start --he-context ... --binding-key ..."
        )
    return BankSecrets(Path(secret).expanduser(), Path(key).expanduser())


@lru_cache(maxsize=4)
def secret_context(path: Path, fingerprint: str) -> HEContext:
    return load_secret_context(path, expected_fingerprint=fingerprint)


def check_initial(task: RoundTask, initial_hash: str, bank: str) -> None:
    """The initial state this bank rebuilt must be the operator's, or the global would be wrong."""
    if initial_hash != task.he_initial_hash:
        raise ValueError(
            f"bank {bank}: the initial state rebuilt from the model config has hash {initial_hash[:12]}, the "
            f"operator's is {task.he_initial_hash[:12]}: the global cannot be decrypted onto it (same model "
            "config and library versions needed)"
        )


def decrypt_received(
    task: RoundTask, secrets: BankSecrets, bank: str, initial: Mapping[str, torch.Tensor], arrays: ArrayRecord
) -> OrderedDict[str, np.ndarray]:
    """The global state of this round: `initial` + the decrypted aggregate (if any round was aggregated)."""
    try:
        he = secret_context(secrets.context, task.he_fingerprint)
    except ContextMismatchError as error:
        raise ContextMismatchError(f"bank {bank}: its secret HE context is not the federation's: {error}") from None
    received = decrypt_global(initial, protocol.record_to_blob(arrays), he)
    check_aggregate(received, initial, he.params.update_bound, f"bank {bank} round {task.server_round}")
    return received


def check_aggregate(
    received: Mapping[str, np.ndarray], initial: Mapping[str, torch.Tensor], bound: float, who: str
) -> None:
    """Raise AggregateRefused unless the decrypted global is finite and its drift from `initial` within `bound`."""
    drift = flatten(received) - flatten(initial)
    bad = int(drift.size - np.count_nonzero(np.isfinite(drift)))
    if bad:
        raise AggregateRefused(
            f"{who}: the decrypted global aggregate holds {bad} non-finite values; refusing to train on it "
            "(an update was tampered with): the round fails"
        )
    largest = float(np.max(np.abs(drift), initial=0.0))
    if largest > bound:
        raise AggregateRefused(
            f"{who}: the decrypted global aggregate drifts {largest:.4g} from the initial state, above the "
            f"{bound:.4g} no honest aggregate exceeds (a ciphertext was tampered with or overflowed); refusing "
            "to train on it: the round fails"
        )


def encrypted_update(
    task: RoundTask,
    secrets: BankSecrets,
    bank: str,
    local: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    examples: int,
    flower_node: int,
) -> ConfigRecord:
    """The reply's only state: the encrypted weighted drift, bound to this round and node, and tagged."""
    he = secret_context(secrets.context, task.he_fingerprint)
    try:
        blob, clipped = encrypt_drift_counting(local, initial, float(examples), he)
    except ValueError as error:
        raise ValueError(f"bank {bank} round {task.server_round}: its update cannot be encrypted: {error}") from None
    if clipped:
        log(
            WARNING,
            "bank %s round %d: %d values of examples x drift exceeded privacy.he.quantization_bound %g: clipped",
            bank,
            task.server_round,
            clipped,
            he.params.quantization_bound,
        )
    binding = UpdateBinding.for_blob(task.he_run, task.server_round, bank, task.state_hash, blob, flower_node)
    tag = tag_update(read_mac_key(secrets.binding_key), binding)
    return ConfigRecord({**binding.to_dict(), protocol.HE_CIPHERTEXT: blob, protocol.HE_TAG: tag})
