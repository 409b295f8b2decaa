"""Replay protection: stale, duplicated, mismatched and forged updates never reach aggregation."""

from __future__ import annotations

import os

import pytest

from fingpt_federated.privacy.update_binding import (
    MismatchedUpdate,
    ReplayedUpdate,
    ReplayGuard,
    StaleUpdate,
    UnauthenticatedUpdate,
    UpdateBinding,
    new_mac_key,
    sha256_hex,
    tag_update,
)

RUN = "run-42"
KEYS = {"bank-1": new_mac_key(), "bank-2": new_mac_key()}
GLOBAL_1 = sha256_hex(b"global state of round 1")
GLOBAL_2 = sha256_hex(b"global state of round 2")


def signed(node: str, server_round: int, global_hash: str, blob: bytes, run: str = RUN, key: bytes | None = None):
    binding = UpdateBinding.for_blob(run, server_round, node, global_hash, blob)
    return binding, tag_update(key or KEYS[node], binding)


def test_authentic_update_is_accepted():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    guard.verify_update(*signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)


def test_round_t_update_replayed_in_round_t_plus_1_is_stale():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    guard.verify_update(binding, tag, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(StaleUpdate, match="round 1, the current round is 2"):
        guard.verify_update(binding, tag, blob, server_round=2, global_hash=GLOBAL_2)


def test_duplicate_update_is_rejected():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    guard.verify_update(binding, tag, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(ReplayedUpdate, match="already accepted"):
        guard.verify_update(binding, tag, blob, server_round=1, global_hash=GLOBAL_1)


def test_another_banks_ciphertext_resubmitted_under_its_own_key_is_a_replay():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    guard.verify_update(*signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(ReplayedUpdate):
        guard.verify_update(*signed("bank-2", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)


def test_update_from_another_global_state_or_run_is_mismatched():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    with pytest.raises(MismatchedUpdate, match="global state"):
        guard.verify_update(*signed("bank-1", 2, GLOBAL_1, blob), blob, server_round=2, global_hash=GLOBAL_2)
    with pytest.raises(MismatchedUpdate, match="run other-run"):
        guard.verify_update(
            *signed("bank-1", 2, GLOBAL_2, blob, run="other-run"), blob, server_round=2, global_hash=GLOBAL_2
        )
    guard.verify_update(*signed("bank-1", 2, GLOBAL_2, blob), blob, server_round=2, global_hash=GLOBAL_2)


def test_forged_or_altered_updates_are_unauthenticated():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    altered = bytes([blob[0] ^ 1]) + blob[1:]
    with pytest.raises(UnauthenticatedUpdate, match="does not match"):
        guard.verify_update(binding, tag, altered, server_round=1, global_hash=GLOBAL_1)
    moved = UpdateBinding(RUN, 2, "bank-1", GLOBAL_2, binding.ciphertext_hash)
    with pytest.raises(UnauthenticatedUpdate, match="invalid tag"):
        guard.verify_update(moved, tag, blob, server_round=2, global_hash=GLOBAL_2)
    with pytest.raises(UnauthenticatedUpdate, match="invalid tag"):
        wrong_key = signed("bank-1", 1, GLOBAL_1, blob, key=KEYS["bank-2"])
        guard.verify_update(*wrong_key, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(UnauthenticatedUpdate, match="no MAC key"):
        unknown = signed("bank-9", 1, GLOBAL_1, blob, key=new_mac_key())
        guard.verify_update(*unknown, blob, server_round=1, global_hash=GLOBAL_1)
    guard.verify_update(binding, tag, blob, server_round=1, global_hash=GLOBAL_1)


def test_binding_survives_transport_as_plain_values():
    binding, tag = signed("bank-2", 3, GLOBAL_2, b"ciphertext")
    again = UpdateBinding.from_dict(binding.to_dict())
    assert again == binding and tag_update(KEYS["bank-2"], again) == tag
