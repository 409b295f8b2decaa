"""The Flower App submitted to a SuperLink, and waiting for a submitted run to finish.

The app is a pyproject.toml alone: its components (`fingpt_federated.server.app:app`,
`fingpt_federated.client.app:app`) are imported from the fingpt-federated package installed on
each machine. In a deployment that matters for the banks: the bundle (FAB) the operator sends
carries no code, so a SuperNode runs the ClientApp its own bank installed and reviewed, not code
shipped by the operator. Its `[tool.flwr.app.config]` declares the run-config keys the apps read,
because `flwr run` refuses keys that are not declared.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import tomli_w

from fingpt_federated.federation import protocol
from fingpt_federated.server.control import FlowerControl

COMPLETED = "finished:completed"
FINISHED = "finished:"
STATUS_POLL_S = 1.0


def write_app(folder: Path, name: str) -> Path:
    """Write the pyproject-only app into `folder` (the directory `flwr run` bundles)."""
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": name,
            "version": "1.0.0",
            "description": "fingpt-federated apps, imported from the installed package",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fingpt-federated",
                    "components": {
                        "serverapp": "fingpt_federated.server.app:app",
                        "clientapp": "fingpt_federated.client.app:app",
                    },
                    "config": {protocol.RUN_CONFIG_PATH: "", protocol.RUN_SPEC_PATH: "", protocol.RUN_DIR: ""},
                }
            }
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return folder


def write_run_config(path: Path, config_path: Path, spec_path: Path, run_dir: Path) -> Path:
    """The `--run-config` file: where the ServerApp finds its config and spec and writes its outputs."""
    values = {
        protocol.RUN_CONFIG_PATH: str(config_path.resolve()),
        protocol.RUN_SPEC_PATH: str(spec_path.resolve()),
        protocol.RUN_DIR: str(run_dir.resolve()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values), encoding="utf-8")
    return path


def wait_finished(control: FlowerControl, run_id: int, timeout: float = 60.0) -> dict[str, Any]:
    """The run's record once finished (the log stream may end a moment before the status flips)."""
    deadline = time.monotonic() + timeout
    info = control.run_info(run_id)
    while not str(info.get("status", "")).startswith(FINISHED) and time.monotonic() < deadline:
        time.sleep(STATUS_POLL_S)
        info = control.run_info(run_id)
    return info
