"""Connect a bank to the consortium: check what can be checked locally, then run and watch a SuperNode.

Flower's own messages for the two commonest mistakes are vague ("Connection refused" without the
address; "Failed to activate SuperNode" for a key the operator never registered), so the server
is probed first with bounded retries, and the SuperNode's output is read to turn its exit into
an error that says what to do.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from fingpt_federated.client.worker_channel import NODE_WORKER_SOCKET
from fingpt_federated.federation.flower_env import node_env
from fingpt_federated.federation.process_guard import STOP_GRACE_S, die_with_parent

DEFAULT_RUNTIME_PORT = 9094
RUNTIME_HOST = "127.0.0.1"  # where flower-supernode binds its Runtime API (Flower's default --host)
DEFAULT_MAX_RETRIES = 30
DEFAULT_MAX_WAIT_S = 120.0
TAIL_LINES = 200
OUTPUT_DRAIN_S = 10.0
PROBE_BACKOFF_CAP_S = 5.0
RUNTIME_PORT_TAKEN_MARKER = "SuperNode Runtime HTTP API failed to start"
KEY_REFUSED_MARKER = "[code: 2004]"  # Flower's FLEET_NODE_ACTIVATION_FAILED: no node has this public key
# How often the SuperNode's SuperExec asks it for a message to start a ClientApp for: Flower's
# default is 1.0 s, its minimum 0.01 s; the only one of Flower 1.41's polling intervals that a
# setting reaches (the SuperNode's 3 s wait between pulls from the SuperLink and the ServerApp's 3 s
# wait for replies are constants in its code; the ServerApp's own is replaced by
# server/reply_poll.py). Lowering it shortens every message; docs/benchmarks.md.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_TASK_POLL_S = 0.1


class NodeStartError(RuntimeError):
    """Why the bank's node could not join, with the exit code the CLI returns for it."""

    exit_code = 1


class ServerUnreachable(NodeStartError):
    exit_code = 3


class KeyRefused(NodeStartError):
    exit_code = 4


class TlsRejected(NodeStartError):
    exit_code = 5


class PortTaken(NodeStartError):
    exit_code = 2


@dataclass(frozen=True)
class NodeSettings:
    """A bank's connection. `ca_cert=None` and `private_key=None` only in --insecure mode."""

    server: str
    ca_cert: Path | None
    private_key: Path | None
    data_path: Path
    bank_name: str
    runtime_port: int = DEFAULT_RUNTIME_PORT
    max_retries: int = DEFAULT_MAX_RETRIES
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    node_options: tuple[tuple[str, str | float | bool], ...] = ()
    """More node config for the ClientApp (state-dir, dp-target-epsilon, he-context, ...): a
    string value is a path (made absolute), a number stays a number, a bool a TOML bool."""
    worker_socket: Path | None = None
    """The bank's worker (client/worker.py); None: every ClientApp process does the work itself."""
    task_poll_s: float = DEFAULT_TASK_POLL_S

    @property
    def insecure(self) -> bool:
        return self.ca_cert is None


def split_address(server: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:port`), validated before any connection."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server {server!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def _ssl_failure(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def probe_server(settings: NodeSettings, sleep: Callable[[float], None] = time.sleep) -> None:
    """Reach the server's health endpoint through TLS, retrying with back-off within the bounds.

    A certificate that does not verify is not retried: waiting will not fix a wrong CA file or a
    server certificate that does not name the address the bank dials.
    """
    host, port = split_address(settings.server)
    url_host = f"[{host}]" if ":" in host else host
    scheme = "http" if settings.insecure else "https"
    verify: ssl.SSLContext | bool = (
        False if settings.ca_cert is None else ssl.create_default_context(cafile=str(settings.ca_cert))
    )
    deadline = time.monotonic() + settings.max_wait_s
    delay, attempt, reason = 0.5, 0, ""
    while True:
        attempt += 1
        try:
            response = httpx.get(f"{scheme}://{url_host}:{port}/health", verify=verify, timeout=10.0)
            if response.is_success:
                return
            reason = f"HTTP {response.status_code} from /health"  # e.g. 502 while the SuperLink restarts
        except httpx.TransportError as exc:
            failure = _ssl_failure(exc)
            if failure is not None:
                raise TlsRejected(
                    f"the server at {settings.server} failed TLS verification against {settings.ca_cert}: "
                    f"{failure}. Check that this is the consortium's ca.crt and that the server "
                    f"certificate names {host!r}."
                ) from None
            reason = str(exc) or type(exc).__name__
        if attempt > settings.max_retries or time.monotonic() + delay > deadline:
            raise ServerUnreachable(
                f"cannot reach the SuperLink at {settings.server} after {attempt} attempts "
                f"over {settings.max_wait_s:.0f}s at most: {reason}"
            )
        sleep(delay)
        delay = min(delay * 2, PROBE_BACKOFF_CAP_S)


def toml_literal(value: str) -> str:
    """A TOML literal string; Flower's --node-config splits on whitespace outside quotes."""
    if "'" in value or "\n" in value:
        raise ValueError(f"{value!r}: a path with a single quote or newline cannot be passed to Flower")
    return f"'{value}'"


def node_config_values(settings: NodeSettings) -> dict[str, str | float | bool]:
    """The node config: data path and bank name, then the node options (paths made absolute).

    The bank's worker gets these values at start; the SuperNode gets them as `--node-config`,
    with the worker's socket added when there is one.
    """
    values: dict[str, str | float | bool] = {
        "data-path": str(settings.data_path.resolve()),
        "bank-name": settings.bank_name,
    }
    for key, value in settings.node_options:
        if isinstance(value, str):
            values[key] = str(Path(value).expanduser().resolve())
        elif isinstance(value, bool):
            values[key] = value
        else:
            values[key] = float(value)
    return values


def node_config(settings: NodeSettings) -> str:
    """The `--node-config` value: the node config as TOML values, and the worker's socket."""
    values = node_config_values(settings)
    if settings.worker_socket is not None:
        values[NODE_WORKER_SOCKET] = str(settings.worker_socket)
    items = []
    for key, value in values.items():
        if isinstance(value, str):
            items.append(f"{key}={toml_literal(value)}")
        elif isinstance(value, bool):
            items.append(f"{key}={str(value).lower()}")
        else:
            items.append(f"{key}={float(value)!r}")
    return " ".join(items)


def supernode_env(settings: NodeSettings) -> dict[str, str]:
    """Flower's environment (federation/flower_env.py) with the SuperExec's task poll interval."""
    return {**node_env(), TASK_POLL_ENV: repr(float(settings.task_poll_s))}


def supernode_command(settings: NodeSettings) -> list[str]:
    command = [
        str(Path(sys.executable).parent / "flower-supernode"),
        "--superlink",
        settings.server,
        "--node-config",
        node_config(settings),
        "--port",
        str(settings.runtime_port),
        "--max-retries",
        str(settings.max_retries),
        "--max-wait-time",
        str(settings.max_wait_s),
    ]
    if settings.insecure:
        return command + ["--insecure"]
    assert settings.ca_cert is not None and settings.private_key is not None
    return command + [
        "--root-certificates",
        str(settings.ca_cert),
        "--auth-supernode-private-key",
        str(settings.private_key),
    ]


def port_taken_message(port: int) -> str:
    return (
        f"runtime port {port} on {RUNTIME_HOST} is already in use (another bank's node on this machine?); "
        "choose a free one with --runtime-port"
    )


def classify_exit(settings: NodeSettings, returncode: int, tail: list[str]) -> NodeStartError:
    text = "\n".join(tail)
    if RUNTIME_PORT_TAKEN_MARKER in text:  # taken between the check in `start` and the SuperNode's bind
        return PortTaken(port_taken_message(settings.runtime_port))
    if KEY_REFUSED_MARKER in text:
        return KeyRefused(
            f"the SuperLink at {settings.server} refused this bank's key {settings.private_key}: the "
            f"operator has not registered its public key ({settings.private_key}.pub), or removed it. "
            "Send the .pub file and its fingerprint to the operator."
        )
    if "Connection refused" in text or "Giving up reconnection" in text or "ConnectError" in text:
        return ServerUnreachable(
            f"lost the SuperLink at {settings.server}: it stayed unreachable through "
            f"{settings.max_retries} retries / {settings.max_wait_s:.0f}s"
        )
    return NodeStartError(f"the SuperNode exited with code {returncode}; its last lines:\n" + "\n".join(tail[-15:]))


def _pump(stream: IO[str], tail: collections.deque[str]) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))


def guarded_command(command: list[str]) -> list[str]:
    """`command` under `federation.process_guard`, which ends the SuperNode's whole tree with it."""
    return [sys.executable, "-m", "fingpt_federated.federation.process_guard", "--", *command]


def runtime_port_free(port: int, host: str = RUNTIME_HOST) -> bool:
    """Whether the SuperNode can bind its Runtime API port (bound the way uvicorn binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def run_supernode(settings: NodeSettings) -> None:
    """Run the SuperNode in the foreground until it ends; raise a `NodeStartError` if it failed.

    The SuperNode runs under a process guard that Linux signals when this process dies, even by
    SIGKILL, and that then stops the SuperNode, its SuperExec and its ClientApps: an orphaned node
    would keep the bank's identity and Runtime port and fail every round on its closed output pipe.
    SIGINT and SIGTERM are passed on so the node deregisters cleanly from the SuperLink. The exit
    is awaited with `wait()`, not the end of its output: Flower's SuperExec inherits the output
    pipe and only exits once the SuperNode has been reaped, so waiting for EOF first would never end.
    """
    parent = os.getpid()
    proc = subprocess.Popen(
        guarded_command(supernode_command(settings)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=supernode_env(settings),
        start_new_session=True,
        preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    assert proc.stdout is not None
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # the guard stops the tree within its grace period
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S + OUTPUT_DRAIN_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    reader.join(timeout=OUTPUT_DRAIN_S)
    if returncode not in (0, -signal.SIGTERM):
        raise classify_exit(settings, returncode, list(tail))
