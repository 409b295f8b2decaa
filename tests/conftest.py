"""Shared fixtures. Real data sets are read from ../shared/data (or $FINGPT_SHARED_DATA) when present."""

from __future__ import annotations

import os
import time

import pytest
import torch
from process_watch import leftovers, mark_session, session_processes

from fingpt_federated.conf import CONFIG_DIR, shared_data_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
mark_session()
SESSION_START = time.time() - 1.0  # create times are rounded to the clock tick


# The files whose tests take minutes, longest first (measured on the 2-core machine). They are
# collected first, and the Makefile's `--no-loadscope-reorder` makes xdist hand files out in
# collection order, so the short files fill in around them. xdist's default puts the files with the
# most tests first, which left the audit and the process-hygiene runs alone at the end on one worker.
MINUTES_LONG = (
    "test_privacy_audit_e2e.py",
    "test_process_hygiene.py",
    "test_deployment.py",
    "test_federation_sim.py",
    "test_scale_bounds.py",
    "test_he_simulation.py",
    "test_registry.py",
    "test_he_dp_deployment.py",
    "test_dp_federation.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(MINUTES_LONG)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def _fail_on_leftovers(before: dict, what: str) -> None:
    left = leftovers(before, SESSION_START)
    if left:
        pytest.fail(f"{what} left {len(left)} process(es) running (now killed):\n" + "\n".join(left), pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def no_process_left_by_the_module():
    """Fails the module whose fixtures leave a process running (or orphaned) after their teardown."""
    before = session_processes(SESSION_START)
    yield
    _fail_on_leftovers(before, "this module's fixtures")


@pytest.fixture(autouse=True)
def no_process_left_by_the_test():
    """Fails a test that leaves a process it started running, a descendant or an orphan."""
    before = session_processes(SESSION_START)
    yield
    _fail_on_leftovers(before, "this test")


def require_shared_data(*relative: str) -> None:
    """Skip, saying why, when a real data set is not beside the checkout."""
    for part in relative:
        path = shared_data_root() / part
        if not path.exists():
            pytest.skip(f"real data {path} is absent (set FINGPT_SHARED_DATA or place ../shared/data beside the repo)")


@pytest.fixture
def data_config_dir():
    return CONFIG_DIR / "data"


@pytest.fixture(scope="module")
def tiny_setting(tmp_path_factory):
    """Tiny backbones cached in a temporary folder; one thread (tiny matrices gain nothing from
    more, and a second thread on a busy shared machine made a step six times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINGPT_CACHE_DIR", str(tmp_path_factory.mktemp("fingpt-cache")))
        yield
    torch.set_num_threads(threads)
