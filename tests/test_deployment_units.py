"""Deployment parts that need no running server: certificates, bank keys, the gateway's allow-list,
the bank allow-list sync, and the commands we build for Flower's CLIs."""

from __future__ import annotations

import importlib
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fingpt_federated.client.supernode import (
    NodeSettings,
    ServerUnreachable,
    probe_server,
    split_address,
    supernode_command,
)
from fingpt_federated.federation.node_keys import (
    check_owner_only,
    fingerprint,
    generate_bank_keys,
    load_bank_private_key,
    load_public_key,
)
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.certificates import (
    TlsFiles,
    certificate_names,
    create_ca,
    create_server_certificate,
)
from fingpt_federated.server.fleet_gateway import is_forwarded
from fingpt_federated.server.superlink import (
    OperatorSettings,
    gateway_command,
    superlink_command,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_signs_a_server_certificate_for_the_bank_facing_names_and_loopback(tmp_path):
    ca_cert, ca_key = create_ca(tmp_path)
    files = create_server_certificate(tmp_path, ["fl.consortium.example", "10.0.0.5"])
    assert mode(ca_key) == 0o600 and mode(files.server_key) == 0o600
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert certificate_names(files.server_cert) == [
        "fl.consortium.example",
        "10.0.0.5",
        "localhost",
        "127.0.0.1",
        "::1",
    ]
    assert TlsFiles.in_folder(tmp_path).missing() == []


def test_existing_keys_are_never_overwritten_by_accident(tmp_path):
    create_ca(tmp_path)
    with pytest.raises(FileExistsError, match="--force"):
        create_ca(tmp_path)
    old = (tmp_path / "ca.key").read_bytes()
    create_ca(tmp_path, overwrite=True)
    assert (tmp_path / "ca.key").read_bytes() != old and mode(tmp_path / "ca.key") == 0o600


def test_bank_keys_are_what_flower_loads_and_the_private_half_is_owner_only(tmp_path):
    private, public = generate_bank_keys(tmp_path / "bank-a")
    assert mode(private) == 0o600 and public.name == "bank-a.pub"
    load_ssh_private_key(private.read_bytes(), None)  # as flower-supernode --auth-supernode-private-key
    register = importlib.import_module("flwr.cli.supernode.register")
    assert register.try_load_public_key(public)  # as flwr supernode register
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint(load_public_key(public)))
    assert fingerprint(load_bank_private_key(private).public_key()) == fingerprint(load_public_key(public))
    with pytest.raises(FileExistsError):
        generate_bank_keys(tmp_path / "bank-a")


def test_a_private_key_others_can_read_is_refused(tmp_path):
    private, _ = generate_bank_keys(tmp_path / "bank")
    private.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        check_owner_only(private)
    with pytest.raises(PermissionError):
        load_bank_private_key(private)


@pytest.mark.parametrize(
    ("method", "path", "forwarded"),
    [
        ("POST", "/v1/fleet/pull-messages", True),
        ("POST", "/v1/fleet/activate-node", True),
        ("GET", "/health", True),
        ("GET", "/v1/fleet/pull-messages", False),
        ("POST", "/v1/control/start-run", False),
        ("POST", "/v1/control/register-node", False),
        ("POST", "/v1/runtime/acquire-task", False),
        ("POST", "/v1/fleet/../control/start-run", False),
        ("GET", "/docs", False),
        ("GET", "/openapi.json", False),
    ],
)
def test_gateway_forwards_only_the_fleet_api_and_health(method, path, forwarded):
    assert is_forwarded(method, path) is forwarded


class FakeControl:
    """Records Control API calls; node ids count up from 100."""

    def __init__(self) -> None:
        self.live: dict[int, str] = {}
        self.calls: list[tuple[str, str]] = []

    def nodes(self):
        return [{"node-id": str(node_id), "status": "registered"} for node_id in self.live]

    def register(self, public_key: Path, name: str) -> int:
        node_id = 100 + len(self.calls)
        self.live[node_id] = name
        self.calls.append(("register", name))
        return node_id

    def unregister(self, node_id: int) -> None:
        self.calls.append(("unregister", self.live.pop(node_id)))


def test_registrations_follow_the_allow_list(tmp_path):
    keys = tmp_path / "keys"
    for name in ("bank-a", "bank-b", "bank-b2"):
        generate_bank_keys(keys / name)
    registry = BankRegistry(tmp_path / "work")
    registry.add(keys / "bank-a.pub")
    registry.add(keys / "bank-b.pub")
    with pytest.raises(ValueError, match="already accepted as bank 'bank-a'"):
        registry.add(keys / "bank-a.pub", "other")
    with pytest.raises(ValueError, match="bank name"):
        registry.add(keys / "bank-b2.pub", "../evil")
    control = FakeControl()
    assert registry.sync(control).registered == ["bank-a", "bank-b"]
    assert registry.sync(control).unchanged == ["bank-a", "bank-b"]

    registry.remove("bank-a")
    registry.add(keys / "bank-b2.pub", "bank-b")  # bank-b rotated its key
    report = registry.sync(control)
    assert report.unregistered == ["bank-a", "bank-b"] and report.registered == ["bank-b"]
    assert sorted(control.live.values()) == ["bank-b"]

    control.live.clear()  # the SuperLink's database was lost: never trust the old record
    assert registry.sync(control).registered == ["bank-b"]


def _flags_in_help(executable: str) -> set[str]:
    out = subprocess.run(
        [str(Path(sys.executable).with_name(executable)), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]+", out))


def test_every_flag_we_pass_to_flower_exists_in_the_installed_flower(tmp_path):
    tls = TlsFiles.in_folder(tmp_path)
    settings = OperatorSettings(tmp_path, tls)
    node = NodeSettings("fl.example:9092", tmp_path / "ca.crt", tmp_path / "bank.key", tmp_path / "data.yaml", "bank-a")
    superlink_flags = {arg for arg in superlink_command(settings) if arg.startswith("--")}
    supernode_flags = {arg for arg in supernode_command(node) if arg.startswith("--")}
    assert superlink_flags <= _flags_in_help("flower-superlink")
    assert supernode_flags <= _flags_in_help("flower-supernode")
    assert "--enable-supernode-auth" in superlink_flags and "--insecure" not in superlink_flags
    insecure = OperatorSettings(tmp_path, None)
    assert "--insecure" in superlink_command(insecure) and "--enable-supernode-auth" not in superlink_command(insecure)
    assert superlink_command(settings)[superlink_command(settings).index("--host") + 1] == "127.0.0.1"
    assert "--insecure" in gateway_command(insecure) and "--cert" in gateway_command(settings)


def test_bank_data_path_reaches_flower_as_one_literal_value(tmp_path):
    node = NodeSettings("h:1", None, None, tmp_path / "my bank" / "data.yaml", "bank a")
    command = supernode_command(node)
    config = command[command.index("--node-config") + 1]
    assert config == f"data-path='{tmp_path / 'my bank' / 'data.yaml'}' bank-name='bank a'"
    with pytest.raises(ValueError, match="single quote"):
        supernode_command(NodeSettings("h:1", None, None, tmp_path / "o'brien.yaml", "b"))


@pytest.mark.parametrize("bad", ["nohost", "host:", ":9092", "host:99999", "host:port"])
def test_server_address_must_be_host_and_port(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address(bad)


def test_unreachable_server_gives_up_after_the_bounded_retries_naming_the_address(tmp_path):
    sleeps: list[float] = []
    node = NodeSettings(
        "127.0.0.1:9", tmp_path / "ca.crt", tmp_path / "k", tmp_path / "d", "b", max_retries=3, max_wait_s=60
    )
    (tmp_path / "ca.crt").write_bytes(create_ca(tmp_path / "ca")[0].read_bytes())
    with pytest.raises(ServerUnreachable, match=r"SuperLink at 127\.0\.0\.1:9 after 4 attempts"):
        probe_server(node, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 2.0]


def test_invalid_bank_data_fails_before_any_connection(tmp_path, capsys):
    from fingpt_federated.client.cli import main

    bad = tmp_path / "bank.yaml"
    bad.write_text(
        "name: broken\nfiles: {train: " + str(tmp_path / "missing.csv") + "}\n"
        "text: {column: text}\nlabel: {column: label, classes: [a, b]}\n"
    )
    private, _ = generate_bank_keys(tmp_path / "bank")
    code = main(
        [
            "start",
            "--server",
            "127.0.0.1:9",
            "--ca",
            str(tmp_path / "none.crt"),
            "--key",
            str(private),
            "--data",
            str(bad),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid data, not connecting" in err and "missing.csv" in err


def test_the_operator_workdir_is_created_owner_only(tmp_path, capsys):
    from fingpt_federated.server.cli import main

    assert main(["banks", "--workdir", str(tmp_path / "consortium")]) == 0
    assert mode(tmp_path / "consortium") == 0o700


def test_fingpt_server_refuses_server_momentum_under_he_before_starting_anything(tmp_path, capsys):
    from omegaconf import OmegaConf

    from fingpt_federated.conf import CONFIG_DIR
    from fingpt_federated.privacy.he_context import HEParams, key_ceremony
    from fingpt_federated.server.cli import main

    params = HEParams.from_config(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "privacy" / "he.yaml").he))
    public = key_ceremony(params, tmp_path / "he").public
    code = main(
        [
            "run",
            "--insecure",
            "--workdir",
            str(tmp_path / "op"),
            "--run-dir",
            str(tmp_path / "run"),
            "--he-public-context",
            str(public),
            "privacy=he",
            "strategy=fedavgm",
        ]
    )
    assert code == 2
    assert "strategy=fedavgm needs the plaintext global state" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
