"""`fingpt-sim` on a running Ray cluster (`simulation.ray_address`) instead of a private Ray.

The slow test starts its own Ray head on this machine (own ports, own temp folder, under the process
guard so that stopping it ends every process of that head and no other Ray on the machine), runs a
2-round tiny federation on it, and reads the head's job table: the run's `flwr-simulation` process was
a driver of that cluster.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from federation_helpers import config

from fingpt_federated.simulations.flower_run import SimulationResources, free_port
from fingpt_federated.simulations.ray_cluster import (
    PRIVATE_RAY,
    RAY_ADDRESS,
    RayClusterError,
    check_reachable,
    ray_env,
    split_address,
)
from fingpt_federated.simulations.sim import simulate

BIN = Path(sys.executable).parent
HEAD_READY_S = 120.0


def test_an_address_is_host_and_port_of_the_head():
    assert split_address("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("ray-head.internal:6380") == ("ray-head.internal", 6380)
    for bad in ("10.0.0.5", ":6379", "head:port", "head:70000", "ray://head:10001"):
        with pytest.raises(RayClusterError, match=r"^simulation\.ray_address"):
            split_address(bad)


def test_without_an_address_the_run_starts_a_private_ray_whatever_ray_start_recorded_here():
    """Ray's `init()` without an address would join the last cluster `ray start` recorded on the machine."""
    assert ray_env(None) == {RAY_ADDRESS: PRIVATE_RAY}
    assert ray_env("10.0.0.5:6379") == {RAY_ADDRESS: "10.0.0.5:6379"}


def test_total_cpus_belongs_to_a_private_ray_only():
    with pytest.raises(RayClusterError, match="simulation.total_cpus applies to a private Ray only"):
        SimulationResources(total_cpus=2, ray_address="127.0.0.1:6379")
    config_line = SimulationResources(client_cpus=2, client_gpus=0.5, ray_address="127.0.0.1:6379").federation_config(9)
    assert config_line == "num-supernodes=9 client-resources-num-cpus=2 client-resources-num-gpus=0.5"


def test_an_unreachable_cluster_is_one_line_before_any_bank_is_prepared(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(RayClusterError, match=f"127.0.0.1:{port}: cannot reach the Ray cluster"):
        check_reachable(f"127.0.0.1:{port}")
    run = subprocess.run(
        [str(BIN / "fingpt-sim"), f"simulation.ray_address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines == [
        f"fingpt-sim: error: simulation.ray_address 127.0.0.1:{port}: cannot reach the Ray cluster (Connection "
        "refused); is `ray start --head` running there, and is its port open to this machine?"
    ], run.stderr
    assert not (tmp_path / "run" / "federation").exists()


@dataclass
class RayHead:
    address: str
    guard: subprocess.Popen


def _gcs_client(address: str):  # type: ignore[no-untyped-def]
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def _wait_for_node(head: RayHead, log: Path) -> None:
    deadline = time.monotonic() + HEAD_READY_S
    while time.monotonic() < deadline:
        if head.guard.poll() is not None:
            raise AssertionError(f"the Ray head ended at start:\n{log.read_text()[-2000:]}")
        try:
            check_reachable(head.address, timeout_s=1.0)
            if any(node.state == 0 for node in _gcs_client(head.address).get_all_node_info().values()):  # ALIVE
                return
        except RayClusterError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"the Ray head did not start in {HEAD_READY_S:.0f} s:\n{log.read_text()[-2000:]}")


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[RayHead]:
    """A one-node Ray cluster with 2 CPUs, as `ray start --head` makes one, stopped by its own process guard
    (never `ray stop`, which would stop every Ray on the machine)."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",  # short: Ray's socket paths must fit in 107 bytes
    ]
    log = tmp_path / "ray-head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as out:
        guard = subprocess.Popen(
            [sys.executable, "-m", "fingpt_federated.federation.process_guard", "--", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    head = RayHead(f"127.0.0.1:{port}", guard)
    try:
        _wait_for_node(head, log)
        yield head
    finally:
        guard.send_signal(signal.SIGTERM)
        try:
            guard.wait(timeout=60)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_fingpt_sim_runs_its_banks_on_a_running_ray_cluster(ray_head, tmp_path):
    cfg = config(
        "federation=iid",
        "federation.num_banks=2",
        "federation.rounds=2",
        "strategy=fedavg",
        "publish.enabled=false",
        "simulation.client_cpus=1",
        f"simulation.ray_address={ray_head.address}",
    )
    summary = simulate(cfg, tmp_path / "run", echo=False)

    assert [r.round for r in summary.rounds] == [0, 1, 2]
    assert all(r.banks_ok == 2 and r.banks_failed == 0 for r in summary.rounds[1:])
    gcs = _gcs_client(ray_head.address)
    drivers = [job.entrypoint for job in gcs.get_all_job_info().values()]
    simulations = [entry for entry in drivers if "flwr-simulation" in entry]
    assert len(simulations) == 1, drivers  # the run's Flower simulation was this cluster's driver
    assert all(job.is_dead for job in gcs.get_all_job_info().values())  # and it left the cluster at its end
    nodes = list(gcs.get_all_node_info().values())
    assert len(nodes) == 1 and nodes[0].state == 0  # the head outlives the run
    assert dict(nodes[0].resources_total)["CPU"] == 2
    assert ray_head.guard.poll() is None
