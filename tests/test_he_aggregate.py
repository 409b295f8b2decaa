"""The operator sums ciphertexts with the public context; banks decrypt FedAvg from it."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.privacy.he_aggregate import aggregate
from fingpt_federated.privacy.he_context import (
    ContextMismatchError,
    HEParams,
    SecretKeyRefused,
    key_ceremony,
    load_public_context,
    load_secret_context,
    new_context,
)
from fingpt_federated.privacy.he_packing import (
    EncryptedUpdate,
    decrypt_mean,
    encrypt_update,
    flatten,
    schema_of,
)

PARAMS = HEParams.from_config(
    {**OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "privacy" / "he.yaml").he), "scheme": "ckks"}
)  # CKKS here (selectable, privacy.he.scheme=ckks); BFV, the default: test_he_bfv.py
WEIGHTS = [1.0, 3.0, 10.0, 50.0, 200.0, 1000.0, 2500.0, 5000.0, 8000.0, 10000.0]


def lora_update(seed: int) -> dict[str, np.ndarray]:
    """LoRA-update magnitudes 1e-2..1 with random signs, over tensors that straddle ciphertexts."""
    rng = np.random.default_rng(seed)
    update = {}
    for name, shape in (("q.lora_B", (64, 40)), ("v.lora_B", (64, 40)), ("head.weight", (3, 64))):
        size = int(np.prod(shape))
        update[name] = (10.0 ** rng.uniform(-2, 0, size) * rng.choice([-1.0, 1.0], size)).reshape(shape)
    return update


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    files = key_ceremony(PARAMS, tmp_path_factory.mktemp("he"))
    return load_secret_context(files.secret), load_public_context(files.public)


@pytest.fixture(scope="module")
def updates():
    return [lora_update(seed) for seed in range(len(WEIGHTS))]


@pytest.fixture(scope="module")
def blobs(contexts, updates):
    bank, _ = contexts
    return [encrypt_update(update, weight, bank) for update, weight in zip(updates, WEIGHTS, strict=True)]


def fedavg(updates, weights) -> np.ndarray:
    return sum(w * flatten(u) for u, w in zip(updates, weights, strict=True)) / sum(weights)


def max_error(blob, bank, updates, weights) -> float:
    mean = decrypt_mean(blob, bank, schema_of(updates[0]), dtype=np.float64)
    return float(np.max(np.abs(flatten(mean) - fedavg(updates, weights))))


def test_ten_bank_encrypted_fedavg_matches_plaintext_fedavg(contexts, updates, blobs):
    bank, operator = contexts
    assert not operator.context.is_private() and not operator.context.has_secret_key()
    summed = aggregate(blobs, operator)
    header = EncryptedUpdate.from_bytes(summed)
    assert header.weight == sum(WEIGHTS) and header.summands == 10
    assert max_error(summed, bank, updates, WEIGHTS) <= 1e-6
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_mean(summed, operator, schema_of(updates[0]))
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(operator.context, header.chunks[0]).decrypt()


def test_smallest_total_weight_still_within_target(contexts, updates):
    bank, operator = contexts
    ones = [encrypt_update(update, 1.0, bank) for update in updates]
    assert max_error(aggregate(ones, operator), bank, updates, [1.0] * len(updates)) <= 1e-6


def test_partial_participation_gives_the_weighted_mean_of_participants(contexts, updates, blobs):
    bank, operator = contexts
    present = [1, 3, 4]
    summed = aggregate([blobs[i] for i in present], operator)
    weights = [WEIGHTS[i] for i in present]
    assert EncryptedUpdate.from_bytes(summed).weight == sum(weights)
    assert max_error(summed, bank, [updates[i] for i in present], weights) <= 1e-6


def test_sums_of_partial_sums_equal_the_full_sum(contexts, updates, blobs):
    bank, operator = contexts
    summed = aggregate([aggregate(blobs[:4], operator), aggregate(blobs[4:], operator)], operator)
    assert EncryptedUpdate.from_bytes(summed).summands == 10
    assert max_error(summed, bank, updates, WEIGHTS) <= 1e-6


def test_update_from_another_ceremony_is_refused_before_adding(contexts, updates, blobs):
    _, operator = contexts
    foreign = encrypt_update(updates[0], 5.0, new_context(PARAMS))
    with pytest.raises(ContextMismatchError, match=r"update #1 .*another key ceremony"):
        aggregate([blobs[0], foreign], operator)


def test_aggregation_refuses_a_secret_context(contexts, blobs):
    bank, _ = contexts
    with pytest.raises(SecretKeyRefused):
        aggregate(blobs[:2], bank)


def test_updates_for_different_layouts_are_not_added(contexts, blobs):
    bank, operator = contexts
    other_layout = encrypt_update({"w": np.ones(5312)}, 1.0, bank)
    with pytest.raises(ValueError, match="another model layout"):
        aggregate([blobs[0], other_layout], operator)


def test_more_summands_than_the_overflow_check_allows_is_refused():
    small = HEParams(**{**PARAMS.__dict__, "max_summands": 2})
    bank = new_context(small)
    blobs = [encrypt_update({"w": np.ones(3)}, 1.0, bank) for _ in range(3)]
    with pytest.raises(ValueError, match="max_summands=2"):
        aggregate(blobs, bank.public())
