"""The operator's ServerApp: rounds of the configured Flower strategy over the banks, checkpointed and resumable.

Inputs come from the run config (pyproject `[tool.flwr.app.config]`, overridden by
`flwr run --run-config`):
- `config-path`: the resolved Hydra config (model, strategy, federation, seed);
- `spec-path`: a FederationSpec (classes, series features; in a simulation also the global test
  set and the simulated banks);
- `run-dir`: where checkpoints, metrics and the final global state go.

Every round ends in `RoundEnd` (Flower calls it as the strategy's `evaluate_fn`, the one hook
that sees each round's new global state): it evaluates on the test set when there is one,
records the round time and writes a checkpoint. A restarted ServerApp with the same `run-dir`
resumes after the last checkpointed round.

With `privacy.he.enabled` the banks' updates are CKKS ciphertexts (server/encrypted_run.py,
server/encrypted_aggregation.py): the global state is an encrypted aggregate the operator cannot read, so
there is no central evaluation and the final state is `global_state.he`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fingpt_federated.conf import save_resolved_config
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.records import BankDataset
from fingpt_federated.federation import protocol, run_inputs
from fingpt_federated.federation.console import quiet_console, round_line
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.features import fit_features_on
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.state import (
    federated_state,
    load_federated_state,
    state_schema_hash,
)
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.server.banks import authenticated_banks
from fingpt_federated.server.best_round import RoundSelection
from fingpt_federated.server.checkpoint import Checkpointer, save_state
from fingpt_federated.server.encrypted_run import EncryptedRun, he_enabled
from fingpt_federated.server.history import CENTRAL, History
from fingpt_federated.server.publish import publish_after_run
from fingpt_federated.server.reply_poll import PollingGrid, SendRecord
from fingpt_federated.server.run_folder import CHECKPOINTS, FINAL_STATE, METRICS_CSV, METRICS_JSON, TIMINGS_JSON
from fingpt_federated.server.strategy_config import build_strategy, check_strategy

DEFAULT_ROUND_TIMEOUT_S = 3600.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_console()
    run_config = context.run_config
    if run_inputs.uses_values(run_config):
        cfg, spec, run_dir = _from_values(grid, context)
    else:
        missing = [key for key in (protocol.RUN_SPEC_PATH, protocol.RUN_DIR) if not run_config.get(key)]
        if missing:
            raise ValueError(f"the run config lacks {missing}: pass them with `flwr run --run-config`")
        cfg = run_inputs.config_from_run(run_config)
        spec = FederationSpec.load(str(run_config[protocol.RUN_SPEC_PATH]))
        run_dir = Path(str(run_config[protocol.RUN_DIR]))
    run_federation(PollingGrid(grid), cfg, spec, run_dir)


def _from_values(grid: Grid, context: Context) -> tuple[DictConfig, FederationSpec, Path]:
    """`flwr run .`: compose the config from the run config's values and prepare one bank per SuperNode."""
    num_banks = len(_wait_for_nodes(grid))
    cfg = run_inputs.config_from_run(context.run_config, num_banks)
    check_strategy(cfg, encrypted=he_enabled(cfg))
    spec = run_inputs.prepared_spec(cfg, num_banks)
    given = str(context.run_config.get(protocol.RUN_DIR) or "")
    run_dir = Path(given) if given else Path.cwd() / "outputs" / "flwr-run" / f"run-{context.run_id}"
    save_resolved_config(cfg, run_dir)
    log(INFO, "flwr run: %d banks (%s), outputs in %s", num_banks, cfg.federation.partitioner, run_dir.resolve())
    return cfg, spec, run_dir


def _wait_for_nodes(grid: Grid, timeout_s: float = 60.0) -> list[int]:
    """The SuperNodes of the federation, once they have connected (a simulation starts them with the run)."""
    deadline = time.monotonic() + timeout_s
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if not nodes:
        raise RuntimeError(f"no SuperNode connected within {timeout_s:.0f} s")
    return nodes


def _bank_registry(cfg: DictConfig) -> Callable[[], dict[int, str]] | None:
    """A deployment's reader of node id -> registered bank name (`federation.bank_registry`), else None."""
    folder = cfg.federation.get("bank_registry")
    if not folder:
        return None
    path = Path(str(folder)).expanduser()
    return lambda: authenticated_banks(path)


def run_federation(grid: Grid, cfg: DictConfig, spec: FederationSpec, run_dir: Path) -> History:
    """Train `cfg.federation.rounds` rounds (fewer when resuming); write the final state and metrics."""
    model_cfg = config_dict(cfg.model)
    model, tokenizer = build_model(model_cfg, spec.num_classes, spec.num_features)
    initial = federated_state(model)
    encryption = EncryptedRun.from_config(cfg, run_dir, initial)
    schema = state_schema_hash(initial)
    keep = int(cfg.federation.get("checkpoints_kept", 2))
    checkpointer = Checkpointer(run_dir / CHECKPOINTS, schema, keep, pin=RoundSelection.from_config(cfg).pinned)
    from_round = cfg.federation.get("resume_from_round")
    resumed = checkpointer.resume(None if from_round is None else int(from_round))
    rounds = int(cfg.federation.rounds)
    done = resumed.server_round if resumed else 0
    history = resumed.history if resumed else History()
    fresh = encryption.initial_arrays() if encryption else protocol.state_to_record(initial)
    arrays = resumed.arrays if resumed else fresh
    if resumed:
        log(WARNING, "Resuming from %s: %d of %d rounds done", checkpointer.path(done), done, rounds)
    strategy = build_strategy(cfg, history, round_offset=done, encryption=encryption, registry=_bank_registry(cfg))
    if resumed:
        strategy.restore_server_state(resumed.server_state)
    round_end = RoundEnd(
        run_dir=run_dir,
        history=history,
        checkpointer=checkpointer,
        offset=done,
        rounds=rounds,
        arrays=arrays,
        central=None if encryption else CentralEvaluation.for_spec(spec, model, tokenizer, cfg),
        public_start=_public_start(encryption, spec, model, tokenizer, cfg, initial),
        server_state=strategy.server_state,
        sends=grid.sends if isinstance(grid, PollingGrid) else None,
    )
    if done < rounds:
        # Flower samples banks with the global `random` module: seeded, a run samples the same banks again.
        random.seed(int(cfg.get("seed", 0)) + done)
        strat = cfg.strategy
        steps = strat.get("local_steps")
        task = protocol.task_config(
            model_cfg,
            spec.class_names,
            spec.num_features,
            local_epochs=int(strat.get("local_epochs", 1)),
            local_steps=None if steps is None else int(steps),
            dp=dp_round_config(cfg),
            dp_run=run_dir.resolve().name,
            he=encryption.round_config() if encryption else None,
            control_run=run_dir.resolve().name if strat.get("scaffold", False) or strat.get("feddyn_alpha") else "",
        )
        strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=rounds - done,
            timeout=float(strat.get("round_timeout", DEFAULT_ROUND_TIMEOUT_S)),
            train_config=task,
            evaluate_config=protocol.task_config(
                model_cfg,
                spec.class_names,
                spec.num_features,
                dp=dp_round_config(cfg),  # whether banks may report metrics
                he=encryption.round_config() if encryption else None,
            ),
            evaluate_fn=round_end,
        )
    if encryption:
        final = encryption.write_final(round_end.arrays)
    else:
        final = save_state(round_end.arrays, run_dir / FINAL_STATE, metadata={"rounds": str(rounds), "schema": schema})
    write_metrics(history, run_dir)
    log(INFO, "Global state after %d rounds: %s", rounds, final)
    log(INFO, "%s", publish_after_run(cfg, spec, history, run_dir, final))
    return history


def dp_round_config(cfg: DictConfig) -> dict[str, Any] | None:
    """The `privacy.dp` block the banks train with (None without DP), checked here so that a bad
    setting stops the run before any bank trains. Its noise is calibrated for every round of the
    run unless `planned_rounds` says otherwise (with partial participation that is conservative)."""
    privacy = cfg.get("privacy")
    dp = None if privacy is None else privacy.get("dp")
    if dp is None or not dp.get("enabled", False):
        return None
    block = config_dict(dp)
    if block.get("planned_rounds") is None:
        block["planned_rounds"] = int(cfg.federation.rounds)
    DPSettings.from_mapping(block)
    for bank in block.get("banks") or {}:
        DPSettings.from_mapping(block, bank=bank)
    return block


def _public_start(
    encryption: EncryptedRun | None, spec: FederationSpec, model: Any, tokenizer: Any, cfg: DictConfig, initial: Any
) -> Callable[[], dict[str, float]] | None:
    """Under HE, round 0's test of the initial state: it is public (built from the model config), so the
    operator evaluates it as in a plaintext run, and the report starts where a plaintext run's does."""
    central = CentralEvaluation.for_spec(spec, model, tokenizer, cfg) if encryption else None
    if central is None:
        return None
    record = protocol.state_to_record(initial)
    return lambda: central(record)


@dataclass
class CentralEvaluation:
    """The ServerApp's own test of the global model on a held-out set (simulations have one).

    The server owns no training data, so the series normaliser is fitted on the test inputs
    themselves (labels unused), as a bank fits it on its own data.
    """

    model: HybridFinGPT
    tokenizer: Any
    data: BankDataset
    batch_size: int

    @classmethod
    def for_spec(
        cls, spec: FederationSpec, model: HybridFinGPT, tokenizer: Any, cfg: DictConfig
    ) -> CentralEvaluation | None:
        if not spec.test_dir:
            return None
        data = load_bank(spec.test_dir).train
        if data.series is not None and data.mask is not None:
            model.fit_normalizer(data.series, data.mask)
        fit_features_on(model, data)  # as the series normaliser: on the test inputs, labels unused
        train_cfg = TrainConfig.from_mapping(config_dict(cfg.model.train))
        return cls(model, tokenizer, data, train_cfg.eval_batch_size)

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        load_federated_state(self.model, protocol.record_to_state(arrays))
        return evaluate(self.model, self.tokenizer, self.data, self.batch_size)


@dataclass
class RoundEnd:
    """Flower's `evaluate_fn`: called with the initial state (round 0) and after every round."""

    run_dir: Path
    history: History
    checkpointer: Checkpointer
    offset: int
    rounds: int
    arrays: ArrayRecord
    central: CentralEvaluation | None = None
    server_state: Callable[[], dict[str, np.ndarray]] = dict  # the strategy's own, checkpointed with the state
    started: float = field(default_factory=time.perf_counter)
    public_start: Callable[[], dict[str, float]] | None = None  # HE: round 0 on the public initial state
    sends: list[SendRecord] | None = None  # the PollingGrid's record of the run's messages
    started_at: float = field(default_factory=time.time)  # wall clock, to line up with the banks' logs
    timings: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        round_number = server_round + self.offset
        seconds = time.perf_counter() - self.started
        ended_at = time.time()
        self.arrays = arrays
        if server_round == 0 and self.offset > 0:
            self.restart_clock()
            return None
        metrics = self.central(arrays) if self.central is not None else {}
        evaluated_at = time.time()
        if server_round == 0 and self.public_start is not None:
            metrics = self.public_start()
        if server_round > 0:
            metrics["round_seconds"] = seconds
        if metrics:
            self.history.add(round_number, CENTRAL, CENTRAL, metrics)
            log(INFO, "%s", round_line(round_number, self.rounds, metrics))
        if server_round > 0:
            self.checkpointer.save(round_number, arrays, self.history, self.server_state())
        write_metrics(self.history, self.run_dir)
        if server_round > 0 and self.sends is not None:
            self.write_timings(round_number, ended_at, evaluated_at)
        self.restart_clock()
        values: dict[str, int | float | list[int] | list[float]] = dict(metrics)
        return MetricRecord(values) if values else None

    def restart_clock(self) -> None:
        self.started = time.perf_counter()
        self.started_at = time.time()

    def write_timings(self, round_number: int, ended_at: float, evaluated_at: float) -> None:
        """Append this round's wall-clock steps to `timings.json`: its start (the previous round's end),
        its messages, `ended` (`round_seconds` stops here), `evaluated` (after central evaluation) and
        `saved` (after the checkpoint and metrics files)."""
        assert self.sends is not None
        sends = [send.to_json() for send in self.sends if send.started >= self.started_at]
        self.sends.clear()  # written: the grid's record holds at most one round's messages, not the run's
        self.timings.append(
            {
                "round": round_number,
                "started": self.started_at,
                "sends": sends,
                "ended": ended_at,
                "evaluated": evaluated_at,
                "saved": time.time(),
            }
        )
        atomic_write_bytes(self.run_dir / TIMINGS_JSON, json.dumps({"rounds": self.timings}, indent=1).encode())


def write_metrics(history: History, run_dir: Path) -> None:
    atomic_write_bytes(run_dir / METRICS_JSON, history.to_json().encode())
    atomic_write_bytes(run_dir / METRICS_CSV, history.to_csv().encode())
