"""The operator's bank registry: renaming keeps a bank's key and node; a refused or failed command changes nothing.

Flower never admits a key again once it was unregistered, so renaming must never go through an
unregistration. The SuperLink tests run Flower's real SuperLink (and its `flwr` CLI) on loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fingpt_federated.federation.node_keys import generate_bank_keys
from fingpt_federated.privacy.update_binding import write_mac_key
from fingpt_federated.server.banks import BankRegistry, RegistryError
from fingpt_federated.server.certificates import create_ca, create_server_certificate
from fingpt_federated.server.cli import main as server_cli
from fingpt_federated.server.control import FlowerControl, write_connection
from fingpt_federated.server.superlink import LOOPBACK, OperatorServices, OperatorSettings
from tests.deployment_support import free_port


def keys_for(folder: Path, *names: str) -> dict[str, Path]:
    """{name: public key file}, each with a binding key beside it (KEY.binding)."""
    keys = {}
    for name in names:
        private, public = generate_bank_keys(folder / name)
        write_mac_key(private.with_name(f"{name}.binding"))
        keys[name] = public
    return keys


def cli(workdir: Path, command: str, *args: str) -> int:
    return server_cli([command, "--workdir", str(workdir), *args])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of the banks folder (the registry and the accepted keys), byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".tmp")}


class Operator:
    """A workdir with TLS files and the SuperLink's connection written, as `fingpt-server run` leaves it."""

    def __init__(self, root: Path) -> None:
        self.workdir = root / "operator"
        create_ca(self.workdir / "tls")
        tls = create_server_certificate(self.workdir / "tls", ["localhost"])
        self.settings = OperatorSettings(
            self.workdir, tls, fleet_host=LOOPBACK, fleet_port=free_port(), control_port=free_port()
        )
        write_connection(self.settings.flwr_home, self.settings.control_port, tls.ca_cert)
        self.control = FlowerControl(self.settings.flwr_home)
        self.registry = BankRegistry(self.workdir)

    def running(self) -> OperatorServices:
        return OperatorServices(self.settings)

    def status(self) -> dict[int, str]:
        return {int(node["node-id"]): node["status"] for node in self.control.nodes()}


@pytest.fixture
def operator(tmp_path):
    return Operator(tmp_path)


# Without a SuperLink: the files alone.


def test_rename_moves_key_binding_and_record_and_refuses_a_taken_or_bad_name(tmp_path, capsys):
    keys = keys_for(tmp_path / "keys", "bank-a", "bank-b")
    workdir = tmp_path / "work"
    for name in ("bank-a", "bank-b"):
        assert (
            cli(workdir, "register-bank", str(keys[name]), "--binding-key", str(keys[name].with_suffix(".binding")))
            == 0
        )
    folder = workdir / "banks"
    before = snapshot(folder)
    assert cli(workdir, "rename-bank", "bank-a", "bank-b") == 2
    assert cli(workdir, "rename-bank", "bank-a", "../evil") == 2
    assert cli(workdir, "rename-bank", "bank-a", "bank-z\n") == 2
    assert cli(workdir, "rename-bank", "nobody", "bank-z") == 2
    assert snapshot(folder) == before
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "already exists" in errors[0] and "bank name" in errors[1] and "bank name" in errors[2]

    assert cli(workdir, "rename-bank", "bank-a", "bank_a") == 0
    after = snapshot(folder)
    assert after["bank_a.pub"] == before["bank-a.pub"] and after["bank_a.binding"] == before["bank-a.binding"]
    assert "bank-a.pub" not in after and "bank-a.binding" not in after
    assert cli(workdir, "banks") == 0
    assert "bank_a\tSHA256:" in capsys.readouterr().out


def test_a_bad_binding_key_leaves_no_half_accepted_bank(tmp_path, capsys):
    keys = keys_for(tmp_path / "keys", "bank-a")
    workdir = tmp_path / "work"
    bad = tmp_path / "bad.binding"
    bad.write_text("not a key\n")
    assert cli(workdir, "register-bank", str(keys["bank-a"]), "--binding-key", str(bad)) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (workdir / "banks" / "bank-a.pub").exists()


@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"format": 2, "banks": []}', b'{"bank-a": {"node_id": "x"}}'])
def test_a_damaged_registry_is_refused_in_one_line_and_never_rewritten(tmp_path, capsys, damage):
    keys = keys_for(tmp_path / "keys", "bank-a", "bank-b")
    workdir = tmp_path / "work"
    assert cli(workdir, "register-bank", str(keys["bank-a"])) == 0
    (workdir / "banks" / "registry.json").write_bytes(damage)
    before = snapshot(workdir / "banks")
    assert cli(workdir, "register-bank", str(keys["bank-b"])) == 2
    assert cli(workdir, "banks") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "registry.json is damaged" in err
    assert snapshot(workdir / "banks") == before


def test_a_registry_written_before_revocations_were_recorded_still_reads(tmp_path):
    registry = BankRegistry(tmp_path)
    registry.folder.mkdir()
    registry.registry_path.write_text('{"bank-a": {"fingerprint": "SHA256:x", "node_id": 7}}')
    assert registry.node_ids() == {"bank-a": 7} and registry.load().revoked == {}


# Against Flower's real SuperLink.


@pytest.mark.slow
def test_renaming_on_a_running_superlink_keeps_key_and_node(operator, capsys):
    keys = keys_for(operator.workdir.parent / "keys", "bank-a", "bank-b")
    for name in ("bank-a", "bank-b"):
        assert cli(operator.workdir, "register-bank", str(keys[name])) == 0
    with operator.running():
        assert operator.registry.sync(operator.control).registered == ["bank-a", "bank-b"]
        node_a = operator.registry.node_ids()["bank-a"]
        assert cli(operator.workdir, "rename-bank", "bank-a", "bank-x") == 0
        assert operator.registry.node_ids() == {"bank-x": node_a, "bank-b": operator.registry.node_ids()["bank-b"]}
        assert operator.status()[node_a] == "registered"
        report = operator.registry.sync(operator.control)
        assert report.unchanged == ["bank-b", "bank-x"] and not report.unregistered and not report.registered
    assert "renamed bank 'bank-a' to 'bank-x'" in capsys.readouterr().out


@pytest.mark.slow
def test_remove_then_register_under_a_new_name_between_runs_is_a_rename(operator):
    keys = keys_for(operator.workdir.parent / "keys", "bank-a")
    assert cli(operator.workdir, "register-bank", str(keys["bank-a"])) == 0
    with operator.running():
        operator.registry.sync(operator.control)
    node = operator.registry.node_ids()["bank-a"]
    assert cli(operator.workdir, "remove-bank", "bank-a") == 0  # SuperLink down: nothing revoked yet
    assert cli(operator.workdir, "register-bank", str(keys["bank-a"]), "--name", "bank_a") == 0
    with operator.running():  # what `fingpt-server run` does at start-up
        report = operator.registry.sync(operator.control)
        assert report.renamed == ["bank-a -> bank_a"] and not report.unregistered and not report.registered
        assert operator.registry.node_ids() == {"bank_a": node} and operator.status()[node] == "registered"


@pytest.mark.slow
def test_a_revoked_key_is_refused_up_front_and_the_registry_stays_as_it_was(operator, capsys):
    keys = keys_for(operator.workdir.parent / "keys", "bank-a", "bank-b")
    for name in ("bank-a", "bank-b"):
        assert cli(operator.workdir, "register-bank", str(keys[name])) == 0
    with operator.running():
        operator.registry.sync(operator.control)
        node_a = operator.registry.node_ids()["bank-a"]
        assert cli(operator.workdir, "remove-bank", "bank-a") == 0  # revoked at once: the SuperLink is up
        assert operator.status()[node_a] == "unregistered"
        before = snapshot(operator.registry.folder)
        capsys.readouterr()
        assert cli(operator.workdir, "register-bank", str(keys["bank-a"]), "--name", "bank-x") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was revoked at the SuperLink as bank 'bank-a'" in err and "rename-bank" in err
        assert snapshot(operator.registry.folder) == before
        assert list(operator.registry.node_ids()) == ["bank-b"]
    assert cli(operator.workdir, "register-bank", str(keys["bank-a"]), "--name", "bank-x") == 2  # also when down


@pytest.mark.slow
def test_a_sync_that_fails_midway_keeps_a_true_record_and_a_failed_register_keeps_the_files(operator, capsys):
    keys = keys_for(operator.workdir.parent / "keys", "bank-a", "bank-b", "bank-c", "a-held")
    assert cli(operator.workdir, "register-bank", str(keys["bank-a"])) == 0
    with operator.running():
        operator.registry.sync(operator.control)
        held_node = operator.control.register(keys["a-held"], "a-held")  # a key the SuperLink holds, unrecorded
        assert cli(operator.workdir, "register-bank", str(keys["bank-b"])) == 0
        before = snapshot(operator.registry.folder)
        capsys.readouterr()
        assert cli(operator.workdir, "register-bank", str(keys["a-held"])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already holds this key" in err
        assert snapshot(operator.registry.folder) == before  # no a-held.pub, registry.json unchanged

    # Accepted while the SuperLink was down; `run` then refuses "a-held" (first in order) but registers bank-c.
    (operator.registry.folder / "a-held.pub").write_bytes(keys["a-held"].read_bytes())
    assert cli(operator.workdir, "register-bank", str(keys["bank-c"])) == 0
    with operator.running():
        with pytest.raises(RegistryError, match="already holds this key"):
            operator.registry.sync(operator.control)
        assert sorted(operator.registry.node_ids()) == ["bank-a", "bank-b", "bank-c"]
        assert held_node not in operator.registry.node_ids().values()
