"""One deployed run, from the operator's side: services up, banks synced, run submitted and
followed to its end, outputs checked, services down.

The ServerApp runs on this machine (a subprocess of the SuperLink) and writes its checkpoints,
metrics and final state straight into the run folder. A run folder that already holds
checkpoints is resumed by the ServerApp after its last completed round; that is how a crashed
or killed operator continues: `fingpt-server run --run-dir THE_SAME_FOLDER`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fingpt_federated.conf import compose_config, save_resolved_config
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.columns import class_mapping
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.federation.run_files import FINAL_CIPHERTEXT
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.control import (
    ControlError,
    FlowerControl,
    write_connection,
)
from fingpt_federated.server.encrypted_run import he_enabled
from fingpt_federated.server.flower_app import (
    COMPLETED,
    FINISHED,
    wait_finished,
    write_app,
    write_run_config,
)
from fingpt_federated.server.run_folder import (
    FEDERATION_SPEC,
    FINAL_STATE,
    METRICS_JSON,
    RESOLVED_CONFIG,
)
from fingpt_federated.server.superlink import OperatorServices, OperatorSettings

APP_NAME = "fingpt-federated"
SUMMARY_FILE = "deployment.json"
BANK_POLL_S = 2.0


class RunFailed(RuntimeError):
    """The run did not complete; the message carries Flower's status details."""


@dataclass(frozen=True)
class RunRequest:
    run_dir: Path
    cfg: DictConfig
    test_data: Path | None = None
    bank_wait_s: float = 600.0


def load_config(overrides: list[str], run_dir: Path) -> DictConfig:
    """The run's Hydra config from conf/; a run folder being resumed without new overrides keeps its own."""
    saved = run_dir / RESOLVED_CONFIG
    if saved.is_file() and not overrides:
        print(f"resuming with the config of {saved}", flush=True)
        cfg = OmegaConf.load(saved)
        assert isinstance(cfg, DictConfig)
        return cfg
    return compose_config(overrides, job_name="fingpt-server")


def federation_spec(cfg: DictConfig, test_data: Path | None) -> FederationSpec:
    """The task shape for the ServerApp: from the operator's test set when given, else the data config.

    In a deployment the banks hold all training data; the operator knows the task only from the
    agreed data config (class names, series features), or from a held-out test set of its own,
    which also gives the ServerApp a central evaluation every round.
    """
    if test_data is not None:
        test = load_bank(test_data).train
        return FederationSpec(list(test.class_names), test.num_features, str(test_data.resolve()))
    data = cfg.data
    classes = OmegaConf.to_container(data.label.classes, resolve=True)
    if not isinstance(classes, dict | list):
        raise ValueError(f"data.label.classes must be a list or a mapping, got {classes!r}")
    _, class_names = class_mapping(classes)
    series = data.get("series")
    if not series:
        return FederationSpec(class_names, 0)
    if series.get("layout") == "wide":
        return FederationSpec(class_names, len(series.features))
    raise ValueError(
        f"cannot tell the series features of data={data.name} ({series.get('layout')} layout) from its config: "
        "pass --test-data with a test set in the federation's format"
    )


def wait_for_banks(control: FlowerControl, registry: BankRegistry, needed: int, timeout: float) -> None:
    """Block until `needed` accepted banks are online, reporting who is; fail after `timeout`."""
    names = {int(node_id): name for name, node_id in registry.node_ids().items()}
    deadline = time.monotonic() + timeout
    last = None
    while True:
        online = sorted(
            names.get(int(n["node-id"]), str(n["node-id"])) for n in control.nodes() if n.get("status") == "online"
        )
        if online != last:
            print(f"banks online: {len(online)}/{needed} needed {online}", flush=True)
            last = online
        if len(online) >= needed:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(online)} of the {needed} banks needed came online within {timeout:.0f}s")
        time.sleep(BANK_POLL_S)


def stop_orphaned_runs(control: FlowerControl) -> list[int]:
    """Stop runs that a killed server process left "running" in the SuperLink's database.

    Their ServerApp died with the old SuperLink; Flower would fail them only after its heartbeat
    timeout, and meanwhile banks could still be handed their stale messages.
    """
    orphaned = [int(run["run-id"]) for run in control.runs() if not str(run.get("status", "")).startswith(FINISHED)]
    for run_id in orphaned:
        with contextlib.suppress(ControlError):
            control.stop_run(run_id)
    return orphaned


def prepare_run_dir(request: RunRequest) -> tuple[Path, Path]:
    """Write the config, the spec and the Flower App into the run folder; return (app dir, run-config file)."""
    run_dir = request.run_dir
    config_path = save_resolved_config(request.cfg, run_dir, RESOLVED_CONFIG)
    spec_path = federation_spec(request.cfg, request.test_data).save(run_dir / FEDERATION_SPEC)
    app_dir = write_app(run_dir / "flower" / "app", APP_NAME)
    return app_dir, write_run_config(app_dir.parent / "run_config.toml", config_path, spec_path, run_dir)


def follow(control: FlowerControl, run_id: int, log_path: Path) -> dict[str, Any]:
    """Echo the ServerApp's log while the run lasts (and keep it in `log_path`); its final record."""
    with open(log_path, "a", encoding="utf-8") as log_file:
        for line in control.stream_logs(run_id):
            log_file.write(line)
            sys.stdout.write(line)
            sys.stdout.flush()
    return wait_finished(control, run_id)


def execute(settings: OperatorSettings, request: RunRequest) -> dict[str, Any]:
    """Run the federation to its end and return a summary; raise `RunFailed` if it did not complete."""
    app_dir, run_config = prepare_run_dir(request)
    registry = BankRegistry(settings.workdir)
    control = FlowerControl(settings.flwr_home)
    write_connection(settings.flwr_home, settings.control_port, None if settings.tls is None else settings.tls.ca_cert)
    started = time.perf_counter()

    def admit_banks() -> None:
        for run_id in stop_orphaned_runs(control):
            print(f"stopped run {run_id}, left unfinished by a previous server process", flush=True)
        report = registry.sync(control)
        print(
            f"banks: registered {report.registered}, unregistered {report.unregistered}, unchanged {report.unchanged}"
            + (f", renamed {report.renamed}" if report.renamed else ""),
            flush=True,
        )

    with OperatorServices(settings, before_gateway=admit_banks):
        wait_for_banks(control, registry, int(request.cfg.federation.min_banks), request.bank_wait_s)
        run_id = control.submit(app_dir, run_config)
        print(f"run {run_id} submitted; outputs in {request.run_dir}", flush=True)
        try:
            info = follow(control, run_id, request.run_dir / "flower" / "run.log")
        except BaseException:
            with contextlib.suppress(ControlError):
                control.stop_run(run_id)
            raise
    final = request.run_dir / (FINAL_CIPHERTEXT if he_enabled(request.cfg) else FINAL_STATE)  # HE: the ciphertext
    summary = {
        "run_id": run_id,
        "status": info.get("status"),
        "status_details": info.get("status-details"),
        "seconds": time.perf_counter() - started,
        "flower": info,
        "final_state": str(final),
        "metrics": str(request.run_dir / METRICS_JSON),
    }
    (request.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    if info.get("status") != COMPLETED:
        raise RunFailed(f"run {run_id} ended {info.get('status')}: {info.get('status-details')}")
    missing = [path for path in (final, request.run_dir / METRICS_JSON) if not path.is_file()]
    if missing:
        raise RunFailed(f"run {run_id} completed but the ServerApp wrote no {[p.name for p in missing]}")
    return summary
