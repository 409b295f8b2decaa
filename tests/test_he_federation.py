"""Encrypted aggregation in the federation: the real ServerApp and ClientApp, real TenSEAL, in-process.

The banks talk through `InProcessGrid` (tests/federation_helpers.py); the same apps on Flower's
simulation engine are in tests/test_he_simulation.py. Plaintext and encrypted runs of the same
seeded federation train the same local models, so their globals must agree to CKKS precision.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import (  # noqa: F401
    RecordingGrid,
    config,
    one_torch_thread,
    simulated_nodes,
    write_federation,
)
from flwr.app import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvgM
from safetensors.numpy import load_file

from fingpt_federated.client.app import app as client_app
from fingpt_federated.client.app import evaluate_global
from fingpt_federated.client.app import train as client_train
from fingpt_federated.client.handover import decrypt_final_state
from fingpt_federated.federation import protocol
from fingpt_federated.federation.protocol import Receipt
from fingpt_federated.privacy import bfv_quantize
from fingpt_federated.privacy.he_context import (
    SECRET_NAME,
    HEParams,
    SecretKeyRefused,
    key_ceremony,
    load_secret_context,
)
from fingpt_federated.privacy.he_global import decrypt_global
from fingpt_federated.privacy.he_packing import EncryptedUpdate, decrypt_mean, load_vector, schema_of
from fingpt_federated.server.app import CHECKPOINTS, run_federation
from fingpt_federated.server.bank_rounds import FederationRoundError
from fingpt_federated.server.encrypted_aggregation import EncryptedAggregation
from fingpt_federated.server.encrypted_run import EncryptedRun
from fingpt_federated.server.history import FEDERATION, History
from fingpt_federated.server.strategy_config import build_strategy
from fingpt_federated.simulations.encryption import HE_DIR, bank_secrets, operator_paths

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def federation(
    tmp_path: Path,
    *overrides: str,
    he: bool = True,
    app: ClientApp = client_app,
    grid=RecordingGrid,
    privacy: str = "he",
):
    spec = write_federation(tmp_path / "data")
    cfg = config("strategy=fedavg", "strategy.local_steps=3", *overrides, *([f"privacy={privacy}"] if he else []))
    if he:
        cfg = operator_paths(cfg, tmp_path / "run")
        if not (tmp_path / "run" / HE_DIR).exists():
            bank_secrets(cfg, tmp_path / "run", spec).save(tmp_path / "data" / "spec.json")
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(spec.banks))
    return cfg, spec, grid(app, nodes, run_config)


def secret(tmp_path: Path):
    return load_secret_context(tmp_path / "run" / HE_DIR / SECRET_NAME)


def decrypted_global(tmp_path: Path, blob: bytes) -> dict:
    initial = dict(sorted(load_file(str(tmp_path / "run" / "initial_state.safetensors")).items()))
    return decrypt_global(initial, blob, secret(tmp_path))


def max_error(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(np.asarray(a[n], np.float64) - np.asarray(b[n], np.float64)))) for n in a)


def train_replies(grid: RecordingGrid) -> list:
    return [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN and not r.has_error()]


def test_the_server_holds_only_the_public_context_and_refuses_the_secret_one(tmp_path):
    cfg, spec, _ = federation(tmp_path)
    initial = {"w": torch.zeros(3)}
    strategy = build_strategy(cfg, History(), encryption=EncryptedRun.from_config(cfg, tmp_path / "run", initial))
    encrypted = strategy.strategy
    assert isinstance(encrypted, EncryptedAggregation) and strategy.check_update == encrypted.check_update
    assert not encrypted.he.holds_secret_key and not encrypted.he.context.is_private()
    assert not encrypted.he.context.has_secret_key()
    cfg.privacy.he.public_context = str(tmp_path / "run" / HE_DIR / SECRET_NAME)
    with pytest.raises(SecretKeyRefused, match="SECRET key"):
        EncryptedRun.from_config(cfg, tmp_path / "run", initial)


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam", "fedtrimmedavg"])
def test_a_strategy_that_aggregates_plaintext_is_refused_under_he_where_the_server_never_sees_it(tmp_path, strategy):
    cfg, _, _ = federation(tmp_path, f"strategy={strategy}")
    encryption = EncryptedRun.from_config(cfg, tmp_path / "run", {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=f"strategy={strategy} needs the plaintext global state"):
        build_strategy(cfg, History(), encryption=encryption)
    with pytest.raises(ValueError, match="FedAvgM aggregates plaintext states"):
        EncryptedAggregation(FedAvgM(), **encryption.strategy_kwargs())


@pytest.mark.parametrize("scheme", ["bfv", "ckks"])
def test_encrypted_fedavg_equals_plaintext_fedavg_and_only_ciphertext_leaves_a_bank(tmp_path, scheme):
    plain_cfg, spec, plain_grid = federation(tmp_path / "plain", "federation.rounds=1", he=False)
    run_federation(plain_grid, plain_cfg, spec, tmp_path / "plain" / "run")
    cfg, spec, grid = federation(tmp_path, "federation.rounds=1", f"privacy.he.scheme={scheme}")
    history = run_federation(grid, cfg, spec, tmp_path / "run")

    plain = load_file(str(tmp_path / "plain" / "run" / CHECKPOINTS / "round_0001" / "state.safetensors"))
    blob = (tmp_path / "run" / "global_state.he").read_bytes()
    # CKKS: its rounding grid; BFV: each bank's integers lie within one quantization step of examples x drift
    step = 2.0 ** -bfv_quantize.quantization_bits(secret(tmp_path).params)
    bound = 1e-6 if scheme == "ckks" else len(spec.banks) * step / EncryptedUpdate.from_bytes(blob).weight
    assert max_error(decrypted_global(tmp_path, blob), plain) < bound

    he, public = secret(tmp_path), secret(tmp_path).public()
    initial = dict(sorted(load_file(str(tmp_path / "run" / "initial_state.safetensors")).items()))
    for reply in train_replies(grid):
        content = reply.content
        assert not content.array_records
        blobs = [v for r in content.config_records.values() for v in r.values() if isinstance(v, bytes)]
        assert len(blobs) == 1 and blobs[0] == content[protocol.HE_UPDATE][protocol.HE_CIPHERTEXT]
        update = EncryptedUpdate.from_bytes(blobs[0])
        local = decrypt_mean(blobs[0], he, schema_of(initial), dtype=np.float64)  # the bank's drift, in the clear
        plain_bytes = np.concatenate([(initial[n] + local[n]).astype(np.float32).ravel() for n in initial]).tobytes()
        assert not any(plain_bytes[i : i + 16] in blobs[0] for i in range(0, len(plain_bytes) - 16, 4096))
        assert len(zlib.compress(blobs[0], 9)) > 0.9 * len(blobs[0])
        with pytest.raises(ValueError, match="secret_key"):
            load_vector(public, update.chunks[0]).decrypt()
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert all(list(m.content[protocol.ARRAYS]) == [protocol.HE_AGGREGATE] for m in sent)
    federation_row = next(r for r in history.select("train", FEDERATION))
    assert federation_row.metrics["upload_bytes"] == sum(
        len(protocol.record_to_blob(protocol.blob_to_record(r.content[protocol.HE_UPDATE][protocol.HE_CIPHERTEXT])))
        for r in train_replies(grid)
    )


def test_partial_participation_gives_the_fedavg_global_of_the_banks_that_trained(tmp_path):
    overrides = ("federation.rounds=2", "federation.fraction_train=0.67", "federation.min_banks=1", "seed=1")
    plain_cfg, spec, plain_grid = federation(tmp_path / "plain", *overrides, he=False)
    run_federation(plain_grid, plain_cfg, spec, tmp_path / "plain" / "run")
    cfg, spec, grid = federation(tmp_path, *overrides, "privacy.he.scheme=ckks")  # to CKKS precision: no quantization
    history = run_federation(grid, cfg, spec, tmp_path / "run")

    trained = {n: {r.bank for r in history.select("train") if r.round == n and r.bank != FEDERATION} for n in (1, 2)}
    assert len(trained[1]) == len(trained[2]) == 2 and trained[2] - trained[1], trained
    plain = load_file(str(tmp_path / "plain" / "run" / "global_state.safetensors"))
    final = decrypted_global(tmp_path, (tmp_path / "run" / "global_state.he").read_bytes())
    assert max_error(final, plain) < 1e-5

    out = decrypt_final_state(
        tmp_path / "run" / "global_state.he",
        tmp_path / "run" / "initial_state.safetensors",
        tmp_path / "run" / HE_DIR / SECRET_NAME,
        tmp_path / "published.safetensors",
    )
    published = load_file(str(out))
    assert sorted(published) == sorted(plain) and all(published[n].dtype == np.float32 for n in published)
    assert all(
        np.array_equal(published[n].view(np.uint32) & 0xFFFF, np.zeros_like(published[n], np.uint32)) for n in published
    ), "published values must be bfloat16-representable"
    assert max_error(published, final) < 1e-2


def test_a_round_t_update_replayed_in_round_t_plus_1_is_rejected_before_adding(tmp_path):
    kept = {}
    replaying = ClientApp()
    replaying.evaluate()(evaluate_global)

    @replaying.train()
    def _(msg, context):
        reply = client_train(msg, context)
        task = protocol.RoundTask.from_config(msg.content[protocol.CONFIG])
        bank = reply.content[protocol.RECEIPT]["name"]
        if bank == "bank_0" and task.server_round == 1:
            kept["update"] = reply.content[protocol.HE_UPDATE]
        if bank == "bank_0" and task.server_round == 2:  # the round-1 ciphertext under a fresh receipt
            reply.content[protocol.HE_UPDATE] = kept["update"]
            reply.content[protocol.RECEIPT] = Receipt(bank, 2, task.state_hash).to_config()
        return reply

    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "federation.min_banks=2", app=replaying)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    failed = [r for r in history.rows if r.status == "failed"]
    assert [(r.round, r.bank) for r in failed] == [(2, "bank_0")]
    assert "was made for round 1, the current round is 2" in failed[0].reason


class OperatorCrash(RuntimeError):
    pass


def test_the_replay_guard_survives_a_restart_in_the_middle_of_a_round(tmp_path):
    """Round 2 is rerun after the crash with the same number and global state: only the guard's
    persisted memory tells the pre-crash update of bank_0 from a fresh one."""
    before = {}

    class CrashAfterTraining(RecordingGrid):
        def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
            messages = list(messages)
            if (
                messages[0].metadata.message_type == MessageType.EVALUATE
                and messages[0].content[protocol.CONFIG][protocol.SERVER_ROUND] == 2
            ):
                raise OperatorCrash("the ServerApp dies after aggregating round 2")
            replies = super().send_and_receive(messages, timeout=timeout)
            before.update({r.content[protocol.RECEIPT]["name"]: r for r in replies if protocol.HE_UPDATE in r.content})
            return replies

    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "federation.min_banks=2", grid=CrashAfterTraining)
    with pytest.raises(OperatorCrash):
        run_federation(grid, cfg, spec, tmp_path / "run")

    replaying = ClientApp()
    replaying.evaluate()(evaluate_global)

    @replaying.train()
    def _(msg, context):
        reply = client_train(msg, context)
        if reply.content[protocol.RECEIPT]["name"] == "bank_0":
            reply.content[protocol.HE_UPDATE] = before["bank_0"].content[protocol.HE_UPDATE]
        return reply

    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "federation.min_banks=2", app=replaying)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    failed = [r for r in history.rows if r.status == "failed"]
    assert [(r.round, r.bank) for r in failed] == [(2, "bank_0")]
    assert "already accepted" in failed[0].reason


def test_a_bank_with_another_ceremonys_context_fails_with_a_clear_error(tmp_path):
    cfg, spec, grid = federation(tmp_path, "federation.rounds=1", "federation.min_banks=3")
    other = key_ceremony(HEParams.from_config(cfg.privacy.he), tmp_path / "other")
    spec_path = tmp_path / "data" / "spec.json"
    loaded = type(spec).load(spec_path)
    loaded.banks[1] = type(loaded.banks[1])(**{**loaded.banks[1].__dict__, "he_context": str(other.secret)})
    loaded.save(spec_path)
    with pytest.raises(FederationRoundError, match="bank_1.*another key ceremony"):
        run_federation(grid, cfg, spec, tmp_path / "run")


def test_dp_under_he_sends_ciphertexts_of_noisy_updates_and_a_bank_over_budget_is_left_out(tmp_path):
    """privacy=dp_he: every bank that trains spends epsilon within its budget and sends only a
    ciphertext; a bank whose own budget is too small declines (no ciphertext) and the encrypted
    global is the mean drift of the banks that trained."""
    cfg, spec, grid = federation(
        tmp_path,
        "federation.rounds=2",
        "federation.min_banks=2",
        "privacy.dp.logical_batch_size=16",
        "privacy.dp.physical_batch_size=8",
        "privacy.dp.accountant=rdp",
        "privacy.dp.noise_multiplier=1.0",
        "+privacy.dp.banks.bank_1.target_epsilon=2.0",
        privacy="dp_he",
    )
    history = run_federation(grid, cfg, spec, tmp_path / "run")

    declined = {(r.round, r.bank) for r in history.rows if r.status == "declined"}
    assert declined == {(1, "bank_1"), (2, "bank_1")}
    trained = [r for r in history.select("train") if r.bank != FEDERATION and r.status == "ok"]
    assert {(r.round, r.bank) for r in trained} == {(n, b) for n in (1, 2) for b in ("bank_0", "bank_2")}
    for bank in ("bank_0", "bank_2"):
        first, second = (next(r.metrics["epsilon"] for r in trained if r.round == n and r.bank == bank) for n in (1, 2))
        assert 0 < first < second <= cfg.privacy.dp.target_epsilon

    round_two = [
        r
        for r in train_replies(grid)
        if r.content[protocol.RECEIPT][protocol.SERVER_ROUND] == 2 and protocol.HE_UPDATE in r.content
    ]
    assert sorted(r.content[protocol.RECEIPT]["name"] for r in round_two) == ["bank_0", "bank_2"]
    assert all(not r.content.array_records for r in train_replies(grid))
    initial = dict(sorted(load_file(str(tmp_path / "run" / "initial_state.safetensors")).items()))
    weights, drifts = [], []
    for reply in round_two:
        blob = reply.content[protocol.HE_UPDATE][protocol.HE_CIPHERTEXT]
        weights.append(EncryptedUpdate.from_bytes(blob).weight)
        drifts.append(decrypt_mean(blob, secret(tmp_path), schema_of(initial), dtype=np.float64))
    expected = {
        n: initial[n] + sum(w * d[n] for w, d in zip(weights, drifts, strict=True)) / sum(weights) for n in initial
    }
    final = decrypted_global(tmp_path, (tmp_path / "run" / "global_state.he").read_bytes())
    assert max_error(final, expected) < 1e-4
    assert max_error(final, initial) > 1e-3  # the noisy updates moved the global state


def test_dp_he_spends_exactly_the_budget_of_the_same_dp_run(tmp_path):
    """Encryption changes nothing in DP accounting: each bank's epsilon per round under dp_he equals
    the plaintext dp run's with the same settings (noise is added by the bank before it quantizes and
    encrypts; the ciphertext is post-processing)."""
    settings = (
        "federation.rounds=2",
        "privacy.dp.logical_batch_size=16",
        "privacy.dp.physical_batch_size=8",
        "privacy.dp.accountant=rdp",
        "privacy.dp.noise_multiplier=1.0",
    )

    def spent(history: History) -> dict[tuple[int, str], float]:
        rows = history.select("train")
        return {(r.round, r.bank): r.metrics["epsilon"] for r in rows if r.bank != FEDERATION and r.status == "ok"}

    cfg, spec, grid = federation(tmp_path / "he", *settings, privacy="dp_he")
    encrypted = spent(run_federation(grid, cfg, spec, tmp_path / "he" / "run"))
    cfg, spec, grid = federation(tmp_path / "plain", *settings, privacy="dp")
    plaintext = spent(run_federation(grid, cfg, spec, tmp_path / "plain" / "run"))
    assert len(encrypted) == 6 and encrypted == plaintext
