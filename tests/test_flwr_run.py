"""`flwr run .` from the repository root: the Flower App of pyproject.toml runs as a user runs it.

Flower's CLI starts its own local SuperLink (simulation mode, fixed ports 39091/39093) that outlives
the run; the test gives it a private FLWR_HOME and stops it, found by that home in its command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from fingpt_federated.federation.flower_env import node_env

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def stop_local_superlink(flwr_home: Path) -> None:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            for child in process.children(recursive=True):
                child.kill()
            process.kill()


@pytest.fixture
def flwr_env(tmp_path):
    home = tmp_path / "flwr-home"
    env = {
        **node_env(),  # quiet, offline, no runtime dependency installation, this venv's bin first on PATH
        "FLWR_HOME": str(home),
        "FINGPT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    yield env
    stop_local_superlink(home)


def test_flwr_run_dot_trains_the_default_federation_from_pyproject_values(flwr_env, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "flwr"),
            "run",
            ".",
            "--stream",
            "--run-config",
            f"run-dir='{run_dir}' overrides='publish.enabled=false'",
        ],
        cwd=REPO,
        env=flwr_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = {
        row["round"]
        for row in json.loads((run_dir / "metrics.json").read_text())["rows"]
        if row.get("phase") == "central"
    }
    assert {1, 2} <= rounds, rounds  # pyproject's `rounds = 2`, each evaluated centrally
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "tiny" in resolved and "num_banks: 2" in resolved  # model=tiny_encoder, one bank per SuperNode
    assert (run_dir / "global_state.safetensors").is_file()
