"""Packing a bank's update into CKKS ciphertexts, and publishing its decryption rounded."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import tenseal as ts
import torch
from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.privacy.he_context import (
    ContextMismatchError,
    HEParams,
    new_context,
)
from fingpt_federated.privacy.he_packing import (
    EncryptedUpdate,
    decrypt_mean,
    encrypt_update,
    flatten,
    schema_of,
    unflatten,
)

PARAMS = HEParams.from_config(
    {**OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "privacy" / "he.yaml").he), "scheme": "ckks"}
)  # CKKS here (selectable, privacy.he.scheme=ckks); BFV, the default: test_he_bfv.py
GRID_BITS = PARAMS.round_bits


@pytest.fixture(scope="module")
def he():
    return new_context(PARAMS)


def lora_state(seed: int) -> dict:
    """Three tensors of 3000 + 1100 + 5 values: per-tensor packing would need 4 ciphertexts, not 3."""
    rng = np.random.default_rng(seed)
    return {
        "a.lora_B": torch.tensor(rng.uniform(-1, 1, (30, 100)), dtype=torch.float32),
        "b.lora_B": rng.uniform(-0.1, 0.1, (11, 100)).astype(np.float32),
        "head.bias": rng.uniform(-1, 1, 5).astype(np.float32),
    }


def test_flatten_and_unflatten_keep_names_shapes_order_and_values():
    state = lora_state(0)
    schema = schema_of(state)
    assert [name for name, _ in schema] == ["a.lora_B", "b.lora_B", "head.bias"]
    back = unflatten(flatten(state), schema)
    for name, value in state.items():
        np.testing.assert_array_equal(back[name], np.asarray(value))


def test_update_is_packed_across_tensors_into_the_fewest_ciphertexts(he):
    state = lora_state(1)
    update = EncryptedUpdate.from_bytes(encrypt_update(state, 7.0, he))
    assert len(update.chunks) == 3 and update.num_params == 4105 and update.weight == 7.0
    mean = decrypt_mean(update.to_bytes(), he, schema_of(state), dtype=np.float64)
    assert max(np.max(np.abs(mean[name] - np.asarray(value))) for name, value in state.items()) < 1e-6


def test_every_byte_after_the_header_is_ciphertext(he):
    value, weight = 0.8125, 17.0
    state = {"w": np.full(6000, value, dtype=np.float32)}
    blob = encrypt_update(state, weight, he)
    for plain in (value, weight * value):
        for dtype in (np.float32, np.float64):
            assert np.full(4, plain, dtype=dtype).tobytes() not in blob
    # a constant plaintext compresses to almost nothing; ciphertext words barely compress
    assert len(zlib.compress(blob, 9)) > 0.9 * len(blob)

    other = new_context(PARAMS)
    with pytest.raises(ValueError, match="no secret key"):
        decrypt_mean(blob, he.public(), schema_of(state))
    with pytest.raises(ContextMismatchError, match="another key ceremony"):
        decrypt_mean(blob, other, schema_of(state))
    chunk = EncryptedUpdate.from_bytes(blob).chunks[0]
    with pytest.raises(ValueError, match="secret_key"):
        ts.ckks_vector_from(he.public().context, chunk).decrypt()
    under_wrong_key = np.asarray(ts.ckks_vector_from(other.context, chunk).decrypt())
    assert np.min(np.abs(under_wrong_key - weight * value)) > 1.0
    assert decrypt_mean(blob, he, schema_of(state))["w"] == pytest.approx(value, abs=1e-6)


def test_publish_rounding_changes_the_low_bits(he):
    state = {"w": np.random.default_rng(2).uniform(-1, 1, 4096)}
    blob = encrypt_update(state, 3.0, he)
    chunks = EncryptedUpdate.from_bytes(blob).chunks
    raw = np.concatenate([ts.ckks_vector_from(he.context, chunk).decrypt() for chunk in chunks]) / 3.0
    published = decrypt_mean(blob, he, schema_of(state), dtype=np.float64)["w"]
    scaled = np.ldexp(published, GRID_BITS)
    assert np.array_equal(scaled, np.rint(scaled)), "published values must lie on the 2^-round_bits grid"
    assert np.mean(published != raw) > 0.99
    assert np.max(np.abs(published - raw)) <= 2.0 ** -(GRID_BITS + 1)
    assert np.max(np.abs(published - state["w"])) < 1e-6


def test_update_that_could_overflow_the_aggregate_is_refused(he):
    with pytest.raises(ValueError, match="overflow"):
        encrypt_update({"w": np.full(10, 2.0)}, 10_000.0, he)
    with pytest.raises(ValueError, match="positive example count"):
        encrypt_update({"w": np.ones(10)}, 0.0, he)


def test_decrypting_for_another_model_layout_is_refused(he):
    blob = encrypt_update({"w": np.ones((4, 5))}, 1.0, he)
    with pytest.raises(ValueError, match="another model layout"):
        decrypt_mean(blob, he, (("w", (5, 4)),))
