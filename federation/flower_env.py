"""The environment every Flower process of the project runs in: the operator's and the banks'."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Offline, no telemetry, and never `uv sync` an app's dependencies at run time (shared with the server).
FLOWER_QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
}


def node_env() -> dict[str, str]:
    """The environment of Flower processes: quiet and offline, and this interpreter's bin folder
    first on PATH, where Flower looks for its helpers (`flower-superexec`, `flwr-clientapp`, ...)."""
    env = dict(os.environ)
    env.update(FLOWER_QUIET_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
