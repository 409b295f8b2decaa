"""Run the ServerApp and ClientApp on Flower's simulation engine, the supported (non-deprecated) way.

`flwr run` against a SuperLink started with `--simulation`: the SuperLink launches the ServerApp
and the simulation engine (Ray) in a subprocess, exactly as `flwr run` does for a user's local
simulation. We start that SuperLink ourselves instead of letting `flwr run` start its "local"
one, because Flower's local SuperLink listens on fixed ports (39091, 39093) that concurrent runs
on one machine would share, and outlives the run; ours gets a free port, a private FLWR_HOME in
the run folder, and is stopped with its whole process tree when the run ends.

The app submitted is the pyproject-only Flower App of server/flower_app.py, generated in the run
folder: its components are imported from the installed package, so the same code runs from a
checkout or a wheel.

The banks run on a private Ray started for the run, or on a running Ray cluster the run joins
(`SimulationResources.ray_address`, simulations/ray_cluster.py, docs/scale.md).

`flwr run` exits 0 even when the ServerApp raised, so the run's final status is read back and a
failed run raises `SimulationFailed` with Flower's status details (the ServerApp's exception).
"""

from __future__ import annotations

import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from fingpt_federated.server.control import FlowerControl, write_connection
from fingpt_federated.server.flower_app import (
    COMPLETED,
    wait_finished,
    write_app,
    write_run_config,
)
from fingpt_federated.server.superlink import (
    LOOPBACK,
    ManagedProcess,
    bin_path,
    flower_env,
    sigterm_as_interrupt,
)
from fingpt_federated.simulations.ray_cluster import RayClusterError, ray_env

APP_NAME = "fingpt-federated-simulation"


BANK_INFO = re.compile(r"\(ClientAppActor pid=\d+\)\S*\s+(?:\x1b\[[0-9;]*m)?INFO\b")
"""An INFO line of a ClientApp, as Ray relays it from the actor: `(ClientAppActor pid=7) INFO :  bank ...`."""


def bank_info(line: str) -> bool:
    """Whether a line of the run's log is a bank's INFO line, which the console leaves out: each bank's steps
    and loss are in metrics.json, and Ray relays them with notes on its deduplication. run.log keeps every line;
    a bank's warnings and errors, and the ServerApp's line per round, are echoed."""
    return BANK_INFO.search(line) is not None


class SimulationFailed(RuntimeError):
    """The simulated run did not complete; the message carries Flower's status details."""


@dataclass(frozen=True)
class SimulationResources:
    """Where the banks run and what each takes: CPUs (and GPU share) per simulated bank; CPUs in all for a
    private Ray (None = every core); or `ray_address`, a running Ray cluster to join, whose own resources
    decide how many banks run at once (simulations/ray_cluster.py)."""

    client_cpus: int = 1
    client_gpus: float = 0.0
    total_cpus: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.ray_address and self.total_cpus is not None:
            raise RayClusterError(
                "simulation.total_cpus applies to a private Ray only: a cluster at simulation.ray_address "
                "offers the CPUs its nodes were started with"
            )

    def federation_config(self, num_banks: int) -> str:
        items = {
            "num-supernodes": num_banks,
            "client-resources-num-cpus": self.client_cpus,
            "client-resources-num-gpus": self.client_gpus,
        }
        if self.total_cpus is not None:
            items["init-args-num-cpus"] = self.total_cpus
        return " ".join(f"{key}={value}" for key, value in items.items())


class SimulationControl(FlowerControl):
    """Flower's Control API through the `flwr` CLI, plus submitting a run with a federation config."""

    def submit_simulation(self, app_dir: Path, run_config: Path, federation_config: str) -> int:
        reply = self._call(
            "run", str(app_dir), "--run-config", str(run_config), "--federation-config", federation_config
        )
        return int(reply["run-id"])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def run_flower_simulation(
    run_dir: Path,
    config_path: Path,
    spec_path: Path,
    num_banks: int,
    resources: SimulationResources = SimulationResources(),
    *,
    echo: bool = True,
) -> dict:
    """Run one simulated federation to its end; return Flower's run record (status, timings).

    The ServerApp writes its outputs into `run_dir`; Flower's own files (app install, SuperLink
    log, the run's log) go to `run_dir/flower/`.
    """
    flower_dir = run_dir / "flower"
    flwr_home = flower_dir / "home"
    app_dir = write_app(flower_dir / "app", APP_NAME)
    run_config = write_run_config(flower_dir / "run_config.toml", config_path, spec_path, run_dir)
    port = free_port()
    write_connection(flwr_home, port, None)
    env = flower_env(flwr_home)
    # The ServerApp's own model work (initial state, central evaluation) gets one bank's CPU share,
    # as Ray gives every ClientApp actor: torch's default of a thread per core was measured 7x
    # slower on a shared 2-core machine.
    env["OMP_NUM_THREADS"] = str(resources.client_cpus)
    env.update(ray_env(resources.ray_address))
    superlink = ManagedProcess(
        "simulation SuperLink",
        [
            bin_path("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            LOOPBACK,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        flower_dir / "superlink.log",
        env,
    )
    control = SimulationControl(flwr_home)
    with sigterm_as_interrupt():  # a killed fingpt-sim must not leave the SuperLink and Ray running
        superlink.start()
        try:
            superlink.wait_listening(LOOPBACK, port)
            run_id = control.submit_simulation(app_dir, run_config, resources.federation_config(num_banks))
            with open(flower_dir / "run.log", "w", encoding="utf-8", buffering=1) as log_file:
                for line in control.stream_logs(run_id):
                    log_file.write(line)
                    if echo and not bank_info(line):
                        sys.stdout.write(line)
                        sys.stdout.flush()
            info = wait_finished(control, run_id)
        finally:
            superlink.stop()
    if info.get("status") != COMPLETED:
        raise SimulationFailed(
            f"simulated run {run_id} ended {info.get('status')}: {info.get('status-details')} "
            f"(log: {flower_dir / 'run.log'})"
        )
    return info
