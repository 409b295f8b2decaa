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
    WrongNodeUpdate,
    new_mac_key,
    sha256_hex,
    tag_update,
)

RUN = "run-42"
KEYS = {"bank-1": new_mac_key(), "bank-2": new_mac_key()}
GLOBAL_1 = sha256_hex(b"global state of round 1")
GLOBAL_2 = sha256_hex(b"global state of round 2")
NODES = {"bank-1": 7_000_000_000_000_000_001, "bank-2": 7_000_000_000_000_000_002, "bank-9": 9}
"""Flower node ids (64-bit, like Flower's)."""


def signed(node: str, server_round: int, global_hash: str, blob: bytes, run: str = RUN, key: bytes | None = None):
    binding = UpdateBinding.for_blob(run, server_round, node, global_hash, blob, NODES[node])
    return binding, tag_update(key or KEYS[node], binding)


def verify(guard, binding, tag, blob, *, server_round, global_hash, src_node=None):
    """The guard's check of a reply that came from `src_node` (default: the node the binding names)."""
    src = binding.flower_node if src_node is None else src_node
    guard.verify_update(binding, tag, blob, server_round=server_round, global_hash=global_hash, src_node=src)


def test_authentic_update_is_accepted():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    verify(guard, *signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)


def test_round_t_update_replayed_in_round_t_plus_1_is_stale():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(StaleUpdate, match="round 1, the current round is 2"):
        verify(guard, binding, tag, blob, server_round=2, global_hash=GLOBAL_2)


def test_duplicate_update_is_rejected():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(ReplayedUpdate, match="already accepted"):
        verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1)


def test_another_banks_ciphertext_resubmitted_under_its_own_key_is_a_replay():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    verify(guard, *signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(ReplayedUpdate):
        verify(guard, *signed("bank-2", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)


def test_update_from_another_global_state_or_run_is_mismatched():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    with pytest.raises(MismatchedUpdate, match="global state"):
        verify(guard, *signed("bank-1", 2, GLOBAL_1, blob), blob, server_round=2, global_hash=GLOBAL_2)
    with pytest.raises(MismatchedUpdate, match="run other-run"):
        verify(guard, *signed("bank-1", 2, GLOBAL_2, blob, run="other-run"), blob, server_round=2, global_hash=GLOBAL_2)
    verify(guard, *signed("bank-1", 2, GLOBAL_2, blob), blob, server_round=2, global_hash=GLOBAL_2)


def test_forged_or_altered_updates_are_unauthenticated():
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    altered = bytes([blob[0] ^ 1]) + blob[1:]
    with pytest.raises(UnauthenticatedUpdate, match="does not match"):
        verify(guard, binding, tag, altered, server_round=1, global_hash=GLOBAL_1)
    moved = UpdateBinding(RUN, 2, "bank-1", GLOBAL_2, binding.ciphertext_hash, binding.flower_node)
    with pytest.raises(UnauthenticatedUpdate, match="invalid tag"):
        verify(guard, moved, tag, blob, server_round=2, global_hash=GLOBAL_2)
    with pytest.raises(UnauthenticatedUpdate, match="invalid tag"):
        wrong_key = signed("bank-1", 1, GLOBAL_1, blob, key=KEYS["bank-2"])
        verify(guard, *wrong_key, blob, server_round=1, global_hash=GLOBAL_1)
    with pytest.raises(UnauthenticatedUpdate, match="no MAC key"):
        unknown = signed("bank-9", 1, GLOBAL_1, blob, key=new_mac_key())
        verify(guard, *unknown, blob, server_round=1, global_hash=GLOBAL_1)
    verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1)


def test_binding_survives_transport_as_plain_values():
    binding, tag = signed("bank-2", 3, GLOBAL_2, b"ciphertext")
    again = UpdateBinding.from_dict(binding.to_dict())
    assert again == binding and tag_update(KEYS["bank-2"], again) == tag


def test_a_bank_replaying_another_nodes_binding_is_refused():
    """bank-2 got hold of bank-1's tagged update and sends it from its own Flower node: refused, and
    rebinding it to its own node breaks the tag."""
    guard = ReplayGuard(RUN, KEYS)
    blob = os.urandom(256)
    binding, tag = signed("bank-1", 1, GLOBAL_1, blob)
    with pytest.raises(WrongNodeUpdate, match="bound to Flower node 7000000000000000001 but arrived from node"):
        verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1, src_node=NODES["bank-2"])
    rebound = UpdateBinding(RUN, 1, "bank-1", GLOBAL_1, binding.ciphertext_hash, NODES["bank-2"])
    with pytest.raises(UnauthenticatedUpdate, match="invalid tag"):
        verify(guard, rebound, tag, blob, server_round=1, global_hash=GLOBAL_1)
    verify(guard, binding, tag, blob, server_round=1, global_hash=GLOBAL_1)  # from its own node: accepted


def test_a_bank_name_belongs_to_its_registered_or_first_node():
    """With the registry, bank-1 is only ever node 1...1; without it, the node of its first accepted update."""
    blob, other = os.urandom(256), os.urandom(256)
    registered = ReplayGuard(RUN, KEYS, nodes={"bank-1": 5})
    with pytest.raises(WrongNodeUpdate, match="bank bank-1 is Flower node 5"):
        verify(registered, *signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)
    pinned = ReplayGuard(RUN, KEYS)
    verify(pinned, *signed("bank-1", 1, GLOBAL_1, blob), blob, server_round=1, global_hash=GLOBAL_1)
    moved = UpdateBinding.for_blob(RUN, 2, "bank-1", GLOBAL_2, other, 12345)
    with pytest.raises(WrongNodeUpdate, match="this update came from node 12345"):
        verify(pinned, moved, tag_update(KEYS["bank-1"], moved), other, server_round=2, global_hash=GLOBAL_2)
