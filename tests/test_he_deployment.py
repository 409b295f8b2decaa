"""The deployment commands of an encrypted federation, and a bank's own node config on `start`."""

from __future__ import annotations

import stat

import numpy as np
import pytest
from flwr.common.config import parse_config_args
from hydra import compose, initialize_config_dir
from safetensors.numpy import load_file, save_file

from fingpt_federated.client.cli import build_parser, node_options
from fingpt_federated.client.cli import main as client_main
from fingpt_federated.client.supernode import (
    NodeSettings,
    node_config,
    supernode_command,
)
from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.privacy.bfv_quantize import quantization_bits
from fingpt_federated.privacy.he_aggregate import aggregate
from fingpt_federated.privacy.he_context import SECRET_NAME, load_secret_context
from fingpt_federated.privacy.he_global import encrypt_drift
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.cli import encrypted_run_paths
from fingpt_federated.server.cli import main as server_main


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_start_passes_the_banks_own_state_dir_budget_and_he_keys_as_node_config(tmp_path):
    args = build_parser().parse_args(
        [
            "start",
            "--server",
            "h:1",
            "--data",
            str(tmp_path / "bank.yaml"),
            "--insecure",
            "--state-dir",
            str(tmp_path / "state"),
            "--dp-target-epsilon",
            "3",
            "--dp-delta",
            "1e-6",
            "--dp-report-validation",
            "--he-context",
            str(tmp_path / "he_secret.ctx"),
            "--binding-key",
            str(tmp_path / "bank.binding"),
        ]
    )
    settings = NodeSettings("h:1", None, None, tmp_path / "bank.yaml", "bank_a", node_options=node_options(args))
    assert node_config(settings) == (
        f"data-path='{tmp_path / 'bank.yaml'}' bank-name='bank_a' state-dir='{tmp_path / 'state'}' "
        f"dp-target-epsilon=3.0 dp-delta=1e-06 dp-report-validation=true he-context='{tmp_path / 'he_secret.ctx'}' "
        f"he-binding-key='{tmp_path / 'bank.binding'}'"
    )
    command = supernode_command(settings)
    assert command[command.index("--node-config") + 1] == node_config(settings)
    parsed = parse_config_args([node_config(settings)])  # as the SuperNode reads it
    assert parsed["dp-report-validation"] is True and parsed["dp-delta"] == 1e-6
    bare = build_parser().parse_args(["start", "--server", "h:1", "--data", "d.yaml", "--insecure"])
    assert node_options(bare) == ()


def test_bank_keygen_and_ceremony_write_owner_only_secrets_and_print_what_goes_where(tmp_path, capsys):
    assert client_main(["keygen", "--key", str(tmp_path / "bank_a")]) == 0
    assert mode(tmp_path / "bank_a.binding") == 0o600
    assert client_main(["keygen", "--key", str(tmp_path / "bank_a")]) == 2
    assert client_main(["he-keygen", "--out", str(tmp_path / "he")]) == 0
    out = capsys.readouterr().out
    assert "binding key" in out and "give this one to the operator" in out
    fingerprint = (tmp_path / "he" / "he_context.sha256").read_text().split()[0]
    assert fingerprint in out and mode(tmp_path / "he" / SECRET_NAME) == 0o600


def operator_config(*overrides: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=["privacy=he", *overrides])


def test_the_operator_needs_the_public_context_and_refuses_the_secret_one(tmp_path, capsys):
    assert client_main(["he-keygen", "--out", str(tmp_path / "he")]) == 0
    cfg = operator_config()
    with pytest.raises(ValueError, match="--he-public-context"):
        encrypted_run_paths(cfg, None, tmp_path)
    with pytest.raises(ValueError, match="SECRET key"):
        encrypted_run_paths(cfg, tmp_path / "he" / SECRET_NAME, tmp_path)
    encrypted_run_paths(cfg, tmp_path / "he" / "he_public.ctx", tmp_path)
    assert cfg.privacy.he.public_context == str(tmp_path / "he" / "he_public.ctx")
    assert cfg.privacy.he.binding_keys == str(tmp_path / "banks")
    code = server_main(
        [
            "run",
            "--workdir",
            str(tmp_path / "op"),
            "--insecure",
            "--he-public-context",
            str(tmp_path / "he" / SECRET_NAME),
            "privacy=he",
        ]
    )
    assert code == 2 and "SECRET key" in capsys.readouterr().err


def test_registering_a_bank_keeps_its_binding_key_owner_only(tmp_path, capsys):
    assert client_main(["keygen", "--key", str(tmp_path / "bank_a")]) == 0
    assert (
        server_main(
            [
                "register-bank",
                "--workdir",
                str(tmp_path / "op"),
                str(tmp_path / "bank_a.pub"),
                "--binding-key",
                str(tmp_path / "bank_a.binding"),
            ]
        )
        == 0
    )
    kept = BankRegistry(tmp_path / "op").folder / "bank_a.binding"
    assert mode(kept) == 0o600 and kept.read_text() == (tmp_path / "bank_a.binding").read_text()


def test_he_decrypt_hands_over_a_bf16_rounded_plaintext_state(tmp_path, capsys):
    assert client_main(["he-keygen", "--out", str(tmp_path / "he")]) == 0
    he = load_secret_context(tmp_path / "he" / SECRET_NAME)
    rng = np.random.default_rng(0)
    initial = {"a.weight": rng.normal(size=(30, 40)).astype(np.float32), "b.bias": np.zeros(7, np.float32)}
    locals_ = [
        {name: value + rng.normal(scale=0.1, size=value.shape).astype(np.float32) for name, value in initial.items()}
        for _ in range(2)
    ]
    blob = aggregate(
        [encrypt_drift(local, initial, weight, he) for local, weight in zip(locals_, (10, 30), strict=True)],
        he.public(),
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "global_state.he").write_bytes(blob)
    save_file(initial, str(run / "initial_state.safetensors"))

    assert (
        client_main(
            [
                "he-decrypt",
                "--run-dir",
                str(run),
                "--context",
                str(tmp_path / "he" / SECRET_NAME),
                "--out",
                str(tmp_path / "state.safetensors"),
            ]
        )
        == 0
    )
    state = load_file(str(tmp_path / "state.safetensors"))
    expected = {name: (10 * locals_[0][name] + 30 * locals_[1][name]) / 40 for name in initial}
    assert sorted(state) == sorted(initial)
    # BFV (the default scheme) rounds each bank's weighted update stochastically to its step, an
    # error below one step per bank in the weighted sum; bf16 then rounds by at most 2^-8 relative.
    quantization_error = len(locals_) * 2.0 ** -quantization_bits(he.params) / 40
    for name, value in state.items():
        assert value.dtype == np.float32 and not (value.view(np.uint32) & 0xFFFF).any()
        bound = (np.max(np.abs(expected[name])) + quantization_error) * 2.0**-8 + quantization_error
        assert np.max(np.abs(value - expected[name])) <= bound
    assert (
        client_main(
            [
                "he-decrypt",
                "--run-dir",
                str(tmp_path),
                "--context",
                str(tmp_path / "he" / SECRET_NAME),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
