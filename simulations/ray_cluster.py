"""Which Ray the simulated banks run on: a private one started for the run, or a running cluster that it joins.

Flower's Ray backend calls `ray.init()` without an address in the `flwr-simulation` process, and Ray then
takes its address from the RAY_ADDRESS variable of that process's environment. Left unset, Ray would join
the last cluster that `ray start` recorded on this machine (its `ray_current_cluster` file), another user's
perhaps; so the run's environment always names one: "local" (a private Ray that ends with the run) or the
cluster's GCS address, `simulation.ray_address`.

The address is checked before any bank is prepared: a cluster that cannot be reached is one line of error,
not a run that fails minutes later inside Flower.
"""

from __future__ import annotations

import socket

RAY_ADDRESS = "RAY_ADDRESS"
PRIVATE_RAY = "local"
CONNECT_TIMEOUT_S = 5.0


class RayClusterError(ValueError):
    """`simulation.ray_address` is malformed or its cluster cannot be reached."""


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6) of a Ray cluster's GCS, as `ray start --head` prints it."""
    where = f"simulation.ray_address {address!r}"
    if "://" in address:
        raise RayClusterError(f"{where}: give the head's GCS address HOST:PORT (Ray Client ray:// is not supported)")
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(f"{where}: expected HOST:PORT of the Ray head, e.g. 10.0.0.5:6379")
    return host, int(port)


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RayClusterError unless something listens at the cluster's GCS address."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise RayClusterError(
            f"simulation.ray_address {address}: cannot reach the Ray cluster ({reason}); "
            "is `ray start --head` running there, and is its port open to this machine?"
        ) from None


def ray_env(address: str | None) -> dict[str, str]:
    """The environment entry that makes Flower's `ray.init()` join `address`, or start a private Ray."""
    return {RAY_ADDRESS: address if address else PRIVATE_RAY}
