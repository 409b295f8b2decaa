"""The operator's Control API calls, made through Flower's own `flwr` CLI on the loopback port.

The CLI is Flower's supported client of the Control API; calling it with `--format json` keeps us
off Flower's internal Python modules, which change between releases. Note that `flwr` exits 0
even when a call fails, so success is read from the JSON it prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fingpt_federated.federation.process_guard import die_with_parent
from fingpt_federated.server.superlink import LOOPBACK, bin_path, flower_env

CONNECTION = "fingpt"
CALL_TIMEOUT_S = 120.0


class ControlError(RuntimeError):
    """A Control API call that the SuperLink refused or that failed."""


def write_connection(flwr_home: Path, port: int, ca_cert: Path | None) -> None:
    """Point the `flwr` CLI at the loopback SuperLink (Flower keeps connections in config.toml)."""
    connection: dict[str, Any] = {"address": f"{LOOPBACK}:{port}"}
    if ca_cert is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(ca_cert.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def connection_port(flwr_home: Path) -> int | None:
    """The loopback port `write_connection` recorded, or None when there is none."""
    path = flwr_home / "config.toml"
    if not path.is_file():
        return None
    address = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"][CONNECTION]["address"]
    return int(address.rpartition(":")[2])


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object `flwr --format json` prints (after any banner lines it may emit first)."""
    start = text.find("{")
    if start < 0:
        raise ControlError(f"flwr printed no JSON: {text.strip()[-500:]}")
    return json.loads(text[start:])


@dataclass(frozen=True)
class FlowerControl:
    """Control API calls against the connection written by `write_connection`."""

    flwr_home: Path

    def _call(self, *args: str, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        result = subprocess.run(
            [bin_path("flwr"), *args, CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=flower_env(self.flwr_home),
        )
        try:
            reply = _json_tail(result.stdout)
        except (ControlError, json.JSONDecodeError):
            raise ControlError(f"flwr {args[0]} failed: {(result.stdout + result.stderr).strip()[-800:]}") from None
        if not reply.get("success", False):
            raise ControlError(str(reply.get("error-message", reply)).strip())
        return reply

    def register(self, public_key: Path, name: str) -> int:
        return int(self._call("supernode", "register", str(public_key), "--name", name)["node-id"])

    def unregister(self, node_id: int) -> None:
        self._call("supernode", "unregister", str(node_id))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._call("supernode", "list")["nodes"])

    def submit(self, app_dir: Path, run_config: Path) -> int:
        """Start a run of the app in `app_dir` with overrides from a TOML file; return its id."""
        return int(self._call("run", str(app_dir), "--run-config", str(run_config))["run-id"])

    def runs(self) -> list[dict[str, Any]]:
        return list(self._call("list")["runs"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        return dict(self._call("list", "--run-id", str(run_id))["runs"][0])

    def stop_run(self, run_id: int) -> None:
        self._call("stop", str(run_id))

    def stream_logs(self, run_id: int) -> Iterator[str]:
        """The run's log lines as the ServerApp writes them; ends when the run finishes."""
        parent = os.getpid()
        with subprocess.Popen(
            [bin_path("flwr"), "log", str(run_id), CONNECTION, "--stream"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=flower_env(self.flwr_home),
            preexec_fn=lambda: die_with_parent(parent, signal.SIGTERM),  # a killed caller leaves no stream behind
        ) as proc:
            assert proc.stdout is not None
            try:
                yield from proc.stdout
            finally:
                if proc.poll() is None:
                    proc.terminate()
                proc.wait(timeout=10)
