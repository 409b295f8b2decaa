"""A real SuperLink with TLS and SuperNode authentication behind the fleet gateway, on loopback:
who gets in, who is refused, and what a bank is told when it cannot join."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from fingpt_federated.federation.node_keys import generate_bank_keys
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.certificates import create_ca, create_server_certificate
from fingpt_federated.server.control import (
    ControlError,
    FlowerControl,
    write_connection,
)
from fingpt_federated.server.superlink import (
    LOOPBACK,
    OperatorServices,
    OperatorSettings,
)
from tests.deployment_support import bank_env, free_port, prepared_banks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """CA, two accepted banks and one rogue key, their data, and the operator's services running."""
    root = tmp_path_factory.mktemp("consortium")
    workdir = root / "operator"
    tls = create_server_certificate(_ca(workdir / "tls"), ["localhost"])
    keys = {name: generate_bank_keys(root / "keys" / name)[0] for name in ("bank-a", "bank-b", "rogue")}
    registry = BankRegistry(workdir)
    registry.add(keys["bank-a"].with_suffix(".pub"))
    registry.add(keys["bank-b"].with_suffix(".pub"))
    settings = OperatorSettings(workdir, tls, fleet_host=LOOPBACK, fleet_port=free_port(), control_port=free_port())
    control = FlowerControl(settings.flwr_home)
    write_connection(settings.flwr_home, settings.control_port, tls.ca_cert)
    services = OperatorServices(settings)
    with services:
        registry.sync(control)
        yield {
            "root": root,
            "settings": settings,
            "services": services,
            "control": control,
            "keys": keys,
            "data": prepared_banks(root / "data", 2),
        }
    leftovers = [p for p in (services.superlink.process, services.gateway.process) if p and p.poll() is None]
    assert not leftovers


def _ca(folder: Path) -> Path:
    create_ca(folder)
    return folder


def fingpt_client(
    consortium, key: str, *extra: str, server: str | None = None, ca: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    settings = consortium["settings"]
    command = [
        sys.executable,
        "-m",
        "fingpt_federated.client.cli",
        "start",
        "--server",
        server or f"localhost:{settings.fleet_port}",
        "--ca",
        str(ca or settings.tls.ca_cert),
        "--key",
        str(consortium["keys"][key]),
        "--data",
        str(consortium["data"][0]),
        "--runtime-port",
        str(free_port()),
        *extra,
    ]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=bank_env(consortium["root"] / f"{key}-flwr-home")
    )


def test_control_and_runtime_apis_are_on_loopback_only(consortium):
    guard = psutil.Process(consortium["services"].superlink.process.pid)
    superlink = next(p for p in guard.children() if "flower-superlink" in " ".join(p.cmdline()))
    listening = {conn.laddr for conn in superlink.net_connections("inet") if conn.status == psutil.CONN_LISTEN}
    assert listening and {addr.ip for addr in listening} == {LOOPBACK}


def test_gateway_serves_banks_over_tls_and_hides_the_control_api(consortium):
    settings = consortium["settings"]
    verify = ssl.create_default_context(cafile=str(settings.tls.ca_cert))
    base = f"https://localhost:{settings.fleet_port}"
    assert httpx.get(f"{base}/health", verify=verify).status_code == 200
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/runtime/acquire-task",
    ):
        assert httpx.post(base + path, content=b"", verify=verify).status_code == 404
    with pytest.raises(httpx.TransportError):  # plaintext is not spoken at all
        httpx.get(f"http://localhost:{settings.fleet_port}/health", timeout=5).raise_for_status()


def test_the_flwr_cli_cannot_reach_the_control_api_through_the_bank_port(consortium, tmp_path):
    settings = consortium["settings"]
    outsider = tmp_path / "outsider-home"
    write_connection(outsider, settings.fleet_port, settings.tls.ca_cert)  # a bank holding ca.crt
    with pytest.raises(ControlError):
        FlowerControl(outsider).nodes()
    assert len(consortium["control"].nodes()) == 2  # the operator, on loopback, can


def test_accepting_and_revoking_a_bank_applies_at_once_to_a_running_superlink(consortium, capsys):
    from fingpt_federated.server.cli import main

    workdir = str(consortium["settings"].workdir)
    public = generate_bank_keys(consortium["root"] / "keys" / "bank-c")[1]
    assert main(["register-bank", str(public), "--workdir", workdir]) == 0
    assert "SuperLink updated: registered ['bank-c']" in capsys.readouterr().out
    assert len(consortium["control"].nodes()) == 3
    assert main(["remove-bank", "bank-c", "--workdir", workdir]) == 0
    assert "unregistered ['bank-c']" in capsys.readouterr().out
    assert len([n for n in consortium["control"].nodes() if n["status"] != "unregistered"]) == 2


def test_an_unregistered_key_is_refused_with_a_clear_message(consortium):
    result = fingpt_client(consortium, "rogue", "--max-retries", "2", "--max-wait", "20")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "refused this bank's key" in result.stderr and "has not registered" in result.stderr


def test_a_server_certificate_from_another_ca_is_rejected_without_retrying(consortium, tmp_path):
    other_ca, _ = create_ca(tmp_path / "other")
    started = time.monotonic()
    result = fingpt_client(consortium, "bank-a", ca=other_ca)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "failed TLS verification" in result.stderr and time.monotonic() - started < 60


def test_an_unreachable_server_is_named_after_the_bounded_retries(consortium):
    closed = free_port()
    result = fingpt_client(consortium, "bank-a", "--max-retries", "2", "--max-wait", "10", server=f"localhost:{closed}")
    assert result.returncode == 3, result.stdout + result.stderr
    assert f"cannot reach the SuperLink at localhost:{closed} after 3 attempts" in result.stderr


def test_tls_is_required_unless_insecure_is_asked_for(consortium, tmp_path, capsys):
    from fingpt_federated.client.cli import main as client_main
    from fingpt_federated.server.cli import main as server_main

    assert server_main(["run", "--workdir", str(tmp_path)]) == 2
    assert "fingpt-server init-ca" in capsys.readouterr().err
    assert client_main(["start", "--server", "localhost:9", "--data", str(consortium["data"][0])]) == 2
    assert "--ca and --key are required" in capsys.readouterr().err


def test_stopping_the_services_leaves_no_process_behind(tmp_path):
    settings = OperatorSettings(tmp_path, None, fleet_host=LOOPBACK, fleet_port=free_port(), control_port=free_port())
    services = OperatorServices(settings)
    with services:
        tree = psutil.Process(services.superlink.process.pid).children(recursive=True)
        assert any("flower-superexec" in " ".join(p.cmdline()) for p in tree)
    for proc in tree:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    with socket.socket() as sock:  # as a restarted SuperLink binds it: connections it closed may be in TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, settings.control_port))
