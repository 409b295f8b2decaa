"""`fingpt-client`'s side of the bank's worker: start it, restart it when it crashes, stop it.

The worker (client/worker.py) runs as this process's user under the process guard
(federation/process_guard.py), which Linux signals when fingpt-client dies, even by SIGKILL, and
which then ends the worker: no worker outlives its bank's fingpt-client. Its socket lives in a
fresh directory of mode 0700 (`tempfile.mkdtemp`) under $XDG_RUNTIME_DIR when set, else the
temporary folder; the directory is removed when the supervisor stops.

A worker that exits while the bank runs is started again after a back-off (0.5 s doubling to
30 s, back to 0.5 s once a worker has lived a minute); a message that arrives meanwhile waits for
it (client/worker_channel.py). The worker's output goes to fingpt-client's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fingpt_federated.client.worker_channel import SOCKET_NAME
from fingpt_federated.federation.flower_env import node_env
from fingpt_federated.federation.process_guard import STOP_GRACE_S, die_with_parent

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


class WorkerSupervisor:
    """The bank's worker while the supervisor is entered (`with WorkerSupervisor(...) as worker:`)."""

    def __init__(self, node_config: dict[str, Any], socket_dir: Path | None = None) -> None:
        self.node_config = node_config
        self._parent_dir = socket_dir
        self.socket_dir: Path | None = None
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def socket_path(self) -> Path:
        assert self.socket_dir is not None, "the supervisor is not started"
        return self.socket_dir / SOCKET_NAME

    @property
    def pid(self) -> int | None:
        """The guard's pid of the current worker (its only child is the worker itself)."""
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def command(self) -> list[str]:
        worker = [
            sys.executable,
            "-m",
            "fingpt_federated.client.worker",
            "--socket",
            str(self.socket_path),
            "--node-config",
            json.dumps(self.node_config),
        ]
        return [sys.executable, "-m", "fingpt_federated.federation.process_guard", "--", *worker]

    def __enter__(self) -> WorkerSupervisor:
        base = self._parent_dir or os.environ.get("XDG_RUNTIME_DIR") or None
        self.socket_dir = Path(tempfile.mkdtemp(prefix="fingpt-worker-", dir=base))  # 0700, this user's
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _spawn(self) -> None:
        parent = os.getpid()
        with self._lock:
            if self._stopping.is_set():
                return
            self._proc = subprocess.Popen(
                self.command(),
                env=node_env(),
                start_new_session=True,
                preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),
            )

    def _watch(self) -> None:
        """Restart the worker whenever it ends while the bank runs."""
        delay = FIRST_BACKOFF_S
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            assert proc is not None
            started = time.monotonic()
            returncode = proc.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > HEALTHY_AFTER_S:
                delay = FIRST_BACKOFF_S
            print(
                f"fingpt-client: the bank's worker ended ({describe_exit(returncode)}); restarting it in {delay:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            delay = min(delay * 2, MAX_BACKOFF_S)

    def stop(self) -> None:
        """End the worker (its guard gives it STOP_GRACE_S, then kills) and remove the socket folder."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
