"""Start, watch and stop the operator's long-running processes: the SuperLink and the fleet gateway.

The SuperLink binds 127.0.0.1 only (its Control and Runtime APIs have no authentication in Flower's
open-source edition); banks reach the Fleet API through `server.fleet_gateway`. Every process is
started in its own session under a process guard (federation/process_guard.py) and stopped with its
whole process tree, because Flower's SuperLink launches a detached SuperExec that in turn launches
the ServerApp (or the simulation and Ray): stopping only the parent would leave them running. Linux
signals the guard when this process dies, even by SIGKILL, so a killed `fingpt-server` or
`fingpt-sim` leaves nothing that holds the ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

import psutil

from fingpt_federated.federation.flower_env import node_env
from fingpt_federated.federation.process_guard import STOP_GRACE_S, die_with_parent
from fingpt_federated.server.certificates import TlsFiles

LOOPBACK = "127.0.0.1"
DEFAULT_FLEET_PORT = 9092
DEFAULT_CONTROL_PORT = 9093
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding like Ctrl-C; `signum` tells a caller which exit code to end with (128 + signum)."""

    signum = signal.SIGTERM


def raise_keyboard_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """A SIGTERM handler that unwinds like Ctrl-C, so `finally` clauses that stop processes run."""
    raise Terminated


def exit_code_of(stop: KeyboardInterrupt) -> int:
    """The shell's exit code for a program stopped by Ctrl-C (130) or by `kill` (143)."""
    return 128 + int(getattr(stop, "signum", signal.SIGINT))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, `kill` (SIGTERM) stops the program the way Ctrl-C does.

    Python's default SIGTERM action ends the process without unwinding, and the process trees
    started in their own sessions (a SuperLink, its SuperExec, Ray) would run on. Signal handlers
    can only be set from the main thread; elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process the operator starts: a bank's, plus a private FLWR_HOME."""
    env = node_env()
    env["FLWR_HOME"] = str(flwr_home)
    return env


def bin_path(name: str) -> str:
    """A console script installed beside this interpreter (the venv's, not whatever PATH holds)."""
    return str(Path(sys.executable).parent / name)


def dialable(bind_host: str) -> str:
    """An address that reaches a listener bound to `bind_host` (a wildcard is reached on loopback)."""
    return {"0.0.0.0": LOOPBACK, "::": "::1", "": LOOPBACK}.get(bind_host, bind_host)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One child process with its output in a log file, stoppable together with its descendants."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        parent = os.getpid()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fingpt_federated.federation.process_guard", "--", *self.command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_listening(self, host: str, port: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until the process accepts connections on `host:port`; fail early if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.name} exited during start-up; last log lines:\n{self.log_tail()}")
            if port_open(host, port):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} did not listen on port {port} within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Have the guard stop the process tree; if it cannot, SIGTERM every descendant (detached ones
        included) and SIGKILL what remains."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S + timeout)
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            tree = [psutil.Process(self.process.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=timeout)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=timeout)
        self.process.wait(timeout=timeout)


@dataclass(frozen=True)
class OperatorSettings:
    """Where the operator's services listen and keep their state.

    `tls=None` means plaintext (the explicit --insecure mode). Node authentication needs TLS, so
    it is on exactly when TLS is.
    """

    workdir: Path
    tls: TlsFiles | None
    fleet_host: str = "0.0.0.0"
    fleet_port: int = DEFAULT_FLEET_PORT
    control_port: int = DEFAULT_CONTROL_PORT

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def database(self) -> Path:
        return self.workdir / "superlink.db"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"


def superlink_command(settings: OperatorSettings) -> list[str]:
    command = [
        bin_path("flower-superlink"),
        "--host",
        LOOPBACK,
        "--port",
        str(settings.control_port),
        "--database",
        str(settings.database),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
    ]
    if settings.tls is None:
        return command + ["--insecure"]
    return command + [
        "--ssl-ca-certfile",
        str(settings.tls.ca_cert),
        "--ssl-certfile",
        str(settings.tls.server_cert),
        "--ssl-keyfile",
        str(settings.tls.server_key),
        "--enable-supernode-auth",
    ]


def gateway_command(settings: OperatorSettings) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "fingpt_federated.server.fleet_gateway",
        "--host",
        settings.fleet_host,
        "--port",
        str(settings.fleet_port),
        "--upstream-port",
        str(settings.control_port),
    ]
    if settings.tls is None:
        return command + ["--insecure"]
    return command + [
        "--ca",
        str(settings.tls.ca_cert),
        "--cert",
        str(settings.tls.server_cert),
        "--key",
        str(settings.tls.server_key),
    ]


class OperatorServices(AbstractContextManager["OperatorServices"]):
    """The SuperLink and its fleet gateway, running for the duration of a `with` block.

    `before_gateway` runs once the SuperLink answers and before banks can reach it: registering
    bank keys there means no bank that dials in early is refused as unknown.
    """

    def __init__(self, settings: OperatorSettings, before_gateway: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.before_gateway = before_gateway
        env = flower_env(settings.flwr_home)
        self.superlink = ManagedProcess(
            "SuperLink", superlink_command(settings), settings.log_dir / "superlink.log", env
        )
        self.gateway = ManagedProcess("fleet gateway", gateway_command(settings), settings.log_dir / "gateway.log", env)

    def start(self) -> None:
        fleet_host = dialable(self.settings.fleet_host)
        for host, port in ((LOOPBACK, self.settings.control_port), (fleet_host, self.settings.fleet_port)):
            if port_open(host, port):
                raise RuntimeError(f"{host}:{port} is already in use (another fingpt-server or SuperLink?)")
        self.settings.workdir.mkdir(parents=True, exist_ok=True)
        self.superlink.start()
        self.superlink.wait_listening(LOOPBACK, self.settings.control_port)
        if self.before_gateway is not None:
            self.before_gateway()
        self.gateway.start()
        self.gateway.wait_listening(fleet_host, self.settings.fleet_port)

    def stop(self) -> None:
        """Gateway first, so no bank request lands on a SuperLink that is going away."""
        self.gateway.stop()
        self.superlink.stop()

    def __enter__(self) -> OperatorServices:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
