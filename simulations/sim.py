"""`fingpt-sim`: a federation of simulated banks on one machine, one command, a report at the end.

    fingpt-sim                                        # defaults of conf/config.yaml
    fingpt-sim data=tfns federation=dirichlet federation.num_banks=10 baseline=true
    fingpt-sim -m strategy=fedavg,fedprox             # one run per strategy (Hydra multirun)

Each run folder (Hydra's output dir) gets: resolved_config.yaml, the prepared federation
(federation/), federation_spec.json, metrics.csv / metrics.json (per round, per bank),
checkpoints/, global_state.safetensors, global.png, banks.png, report.md, and with
`baseline=true` baselines.json. The banks run the same ServerApp and ClientApp as a deployment,
on Flower's simulation engine (simulations/flower_run.py): no network, no open port but loopback.

Simulation-only settings, read with these defaults when the config lacks them:
`simulation.client_cpus` (1), `simulation.client_gpus` (0), `simulation.total_cpus` (all),
`simulation.ray_address` (none: a private Ray; HOST:PORT: join that running Ray cluster, docs/scale.md),
`simulation.stragglers` (share of banks that do only part of each round's work, 0),
`simulation.straggler_work` (the part they do, 0.5), `simulation.fail_banks` (indices of banks
whose ClientApp raises, []), `simulation.hostile_banks` (bank index -> misbehaviour of its train
replies, client/hostile.py, {}), `simulation.register_examples` (false; true: each bank's train rows become
its registered example count, `strategy.update_checks.registered_examples`); `baseline` (false).

`personalize.steps=N` (0: off): each bank also gets its own test split (`personalize.test_fraction` of
its rows, held out before training), personalises the final global model's head (`personalize.part=head`)
or head and LoRA (`head+lora`) for N steps on its train split, and the report and summary.json compare,
per bank on that split, the global, personalised, pooled and alone models (the last two with
`baseline=true`): simulations/personalization.py. `fingpt-sim +experiment=quick_parity` runs it all on the
tiny model.

`privacy=he` (or dp_he): the run folder gets a key ceremony for the simulated banks (`he/`,
simulations/encryption.py); the operator's config points at its public context only, and after
the run the final encrypted global is decrypted as a bank would for publishing.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load_file

from fingpt_federated.client.hostile import parse_all
from fingpt_federated.conf import CONFIG_DIR, save_resolved_config
from fingpt_federated.conf.schema import SimulationConfig
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.federation_layout import TRAINING_TEXTS, FederationLayout, layout_texts, prepare_federation
from fingpt_federated.federation.federation_spec import BankSite, FederationSpec
from fingpt_federated.model.text_length import with_max_length
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.server.app import CHECKPOINTS, dp_round_config, write_metrics
from fingpt_federated.server.best_round import RoundChoice, RoundSelection
from fingpt_federated.server.checkpoint import Checkpointer, CheckpointError
from fingpt_federated.server.encrypted_run import he_enabled
from fingpt_federated.server.history import History
from fingpt_federated.server.run_folder import (
    FEDERATION_SPEC,
    FINAL_STATE,
    METRICS_JSON,
)
from fingpt_federated.server.strategy_config import check_strategy
from fingpt_federated.server.superlink import exit_code_of, sigterm_as_interrupt
from fingpt_federated.simulations import encryption
from fingpt_federated.simulations.baselines import (
    CENTRALIZED,
    BaselineResult,
    mean_local,
    run_baselines,
)
from fingpt_federated.simulations.flower_run import (
    SimulationResources,
    run_flower_simulation,
)
from fingpt_federated.simulations.personalization import (
    BankComparison,
    compare_banks,
    markdown_section,
    personalize_settings,
    verdict_lines,
)
from fingpt_federated.simulations.personalization import summary as per_bank_summary
from fingpt_federated.simulations.privacy_report import (
    EPSILON_PLOT,
    epsilon_section,
    plot_epsilon,
)
from fingpt_federated.simulations.progress import Progress, progress, progress_lines, progress_section, targets
from fingpt_federated.simulations.ray_cluster import RayClusterError, check_reachable
from fingpt_federated.simulations.report import (
    BANKS_PLOT,
    GLOBAL_PLOT,
    REPORT,
    TASK_PLOT,
    RoundRow,
    markdown,
    plot_banks,
    plot_global,
    plot_task_metrics,
    round_rows,
    task_metric_rows,
    wire_bytes_per_parameter,
)
from fingpt_federated.simulations.table_format import figure
from fingpt_federated.strict_json import jsonable
from fingpt_federated.structured_config import checked_dict

BASELINES_FILE = "baselines.json"
SUMMARY_FILE = "summary.json"


@dataclass
class SimulationSummary:
    run_dir: Path
    strategy: str
    banks: list[str]
    rounds: list[RoundRow]
    baselines: list[BaselineResult] = field(default_factory=list)
    per_bank: list[BankComparison] = field(default_factory=list)  # personalize.steps > 0: on each bank's own test
    seconds: float = math.nan
    progress: Progress | None = None  # rounds and seconds to the targets, the swing (simulations/progress.py)
    published: str = ""  # the round publishing takes and its monitor (server/best_round.py), set with the report

    @property
    def final(self) -> RoundRow:
        return self.rounds[-1]

    @property
    def initial(self) -> RoundRow:
        return self.rounds[0]

    def to_dict(self) -> dict:
        return {
            "run_dir": str(self.run_dir),
            "strategy": self.strategy,
            "banks": self.banks,
            "seconds": self.seconds,
            "initial_test_accuracy": self.initial.test_accuracy,
            "final_test_accuracy": self.final.test_accuracy,
            "final_test_loss": self.final.test_loss,
            "round_seconds": [r.seconds for r in self.rounds[1:]],
            "baselines": [b.to_dict() for b in self.baselines],
            "mean_local_only_accuracy": mean_local(self.baselines) if self.baselines else None,
            "progress": self.progress.to_dict() if self.progress else None,
        }

    def pooled_accuracy(self) -> float:
        """The centralized (pooled) model's test accuracy; NaN without baselines."""
        return next((b.test["accuracy"] for b in self.baselines if b.kind == CENTRALIZED), math.nan)

    def pooled_ratio(self) -> float:
        """The federated model's test accuracy over the centralized (pooled) one's; NaN without baselines."""
        pooled = self.pooled_accuracy()
        return self.final.test_accuracy / pooled if pooled > 0 else math.nan


def simulation_settings(cfg: DictConfig) -> dict:
    """The `simulation:` block over its defaults (conf/schema.py: SimulationConfig); an unknown key is an error."""
    return checked_dict(SimulationConfig, cfg.get("simulation"), "simulation")


def simulation_resources(cfg: DictConfig) -> SimulationResources:
    """Each bank's CPUs and GPU share, and the Ray to run on: a private one, or the reachable cluster at
    `simulation.ray_address` (RayClusterError otherwise)."""
    sim = simulation_settings(cfg)
    address = sim["ray_address"] or None
    resources = SimulationResources(int(sim["client_cpus"]), float(sim["client_gpus"]), sim["total_cpus"], address)
    if address:
        check_reachable(address)
    return resources


def federation_spec(cfg: DictConfig, layout: FederationLayout) -> FederationSpec:
    """The simulated banks, with the stragglers (seeded choice), failing and hostile banks the config asks for."""
    sim = simulation_settings(cfg)
    count = len(layout.bank_dirs)
    fail = {int(i) for i in sim["fail_banks"]}
    if any(not 0 <= i < count for i in fail):
        raise ValueError(f"simulation.fail_banks {sorted(fail)} must be bank indices in [0, {count})")
    hostile = hostile_banks(sim["hostile_banks"], count)
    slow = round(float(sim["stragglers"]) * count)
    stragglers = set(np.random.default_rng(int(cfg.get("seed", 0))).choice(count, size=slow, replace=False).tolist())
    banks = [
        BankSite(
            path=str(path.resolve()),
            name=name,
            work=float(sim["straggler_work"]) if i in stragglers else 1.0,
            fail=i in fail,
            hostile=hostile.get(i, ""),
        )
        for i, (path, name) in enumerate(zip(layout.bank_dirs, layout.bank_names, strict=True))
    ]
    return FederationSpec(list(layout.class_names), int(layout.num_features), str(layout.test_dir.resolve()), banks)


def with_registered_examples(cfg: DictConfig, layout: FederationLayout) -> DictConfig:
    """`cfg` with `strategy.update_checks.registered_examples` set to each prepared bank's train rows, as a
    consortium would register them when a bank joins (before any hostile behaviour adds records)."""
    cfg = copy.deepcopy(cfg)
    counts = {name: int(rows) for name, rows in zip(layout.bank_names, layout.train_counts.sum(axis=1), strict=True)}
    with open_dict(cfg):
        cfg.strategy.update_checks.registered_examples = counts
    return cfg


def hostile_banks(configured: dict, count: int | None = None) -> dict[int, str]:
    """`simulation.hostile_banks` checked: behaviours client/hostile.py knows, bank indices in [0, count)
    (not checked while the number of banks is unknown, before the federation is prepared)."""
    banks = {int(index): str(behaviour) for index, behaviour in configured.items()}
    for index, behaviour in banks.items():
        if index < 0 or (count is not None and index >= count):
            raise ValueError(f"simulation.hostile_banks: {index} is not a bank index in [0, {count or 'N'})")
        try:
            parse_all(behaviour)
        except ValueError as error:
            raise ValueError(f"simulation.hostile_banks.{index}: {error}") from None
    return banks


def simulate(cfg: DictConfig, run_dir: Path, *, echo: bool = True) -> SimulationSummary:
    """Prepare the banks, run the federation on Flower's simulation engine, then baselines and report."""
    started = time.perf_counter()
    encrypted = he_enabled(cfg)
    check_strategy(cfg, encrypted)
    # a corrupt checkpoint to resume from stops the run here, before Ray starts (the ServerApp checks it again)
    Checkpointer(run_dir / CHECKPOINTS, None).check_resume(cfg.federation.get("resume_from_round"))
    hostile_banks(simulation_settings(cfg)["hostile_banks"])
    resources = simulation_resources(cfg)  # a cluster that cannot be reached stops the run here
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = encryption.operator_paths(cfg, run_dir) if encrypted else cfg
    layout = prepare_federation(cfg, run_dir / "federation")
    cfg = with_max_length(cfg, layout_texts(layout), TRAINING_TEXTS)  # auto resolved, long texts warned of
    cfg = with_registered_examples(cfg, layout) if simulation_settings(cfg)["register_examples"] else cfg
    config_path = save_resolved_config(cfg, run_dir)
    spec = federation_spec(cfg, layout)
    if encrypted:
        spec = encryption.bank_secrets(cfg, run_dir, spec)
    spec_path = spec.save(run_dir / FEDERATION_SPEC)
    run_flower_simulation(run_dir, config_path, spec_path, len(spec.banks), resources, echo=echo)
    history = History.from_json((run_dir / METRICS_JSON).read_text(encoding="utf-8"))
    if encrypted:
        encryption.publish_and_test(cfg, spec, run_dir, history)
        write_metrics(history, run_dir)
    baselines = run_baselines(cfg, spec, resources.client_cpus) if cfg.get("baseline", False) else []
    if baselines:
        rows = jsonable([b.to_dict() for b in baselines])
        (run_dir / BASELINES_FILE).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    summary = SimulationSummary(
        run_dir,
        str(cfg.strategy.name),
        [b.name for b in spec.banks],
        round_rows(history),
        baselines,
    )
    settings = simulation_settings(cfg)
    wanted = targets(settings["targets"], settings["pooled_targets"], summary.pooled_accuracy())
    summary.progress = progress(summary.rounds, wanted)
    personal = personalize_settings(cfg)
    if personal.steps > 0:
        summary.per_bank = compare_banks(cfg, spec, run_dir / FINAL_STATE, baselines, resources.client_cpus)
    summary.seconds = time.perf_counter() - started
    write_report(cfg, spec, history, summary)
    return summary


def published_line(cfg: DictConfig, choice: RoundChoice) -> str:
    """The round the run's ServerApp published, for the console; empty when it published nothing
    (publishing off, or under HE, where a key-holding bank publishes after the run)."""
    return choice.line() if bool(cfg.publish.enabled) and not he_enabled(cfg) else ""


def strategy_label(strategy: DictConfig) -> str:
    """The strategy's name with the settings that define it: its proximal mu when there is one and the
    Flower class's options, e.g. "fedavgm (server_learning_rate=1.0, server_momentum=0.9)"."""
    settings = {**({"mu": strategy.mu} if strategy.get("mu") else {}), **(strategy.get("options") or {})}
    listed = ", ".join(f"{key}={value}" for key, value in settings.items())
    return f"{strategy.name} ({listed})" if listed else str(strategy.name)


def write_report(cfg: DictConfig, spec: FederationSpec, history: History, summary: SimulationSummary) -> Path:
    run_dir = summary.run_dir
    plot_global(history, summary.baselines, run_dir / GLOBAL_PLOT)
    plot_banks(history, run_dir / BANKS_PLOT)
    choice = RoundSelection.from_config(cfg).choose(history)
    plot_task_metrics(history, choice, run_dir / TASK_PLOT)
    summary.published = published_line(cfg, choice)
    settings = {
        "data": cfg.data.name,
        "model backbone": cfg.model.backbone,
        "strategy": strategy_label(cfg.strategy),
        "banks": f"{len(spec.banks)} ({cfg.federation.partitioner} split)",
        "rounds": cfg.federation.rounds,
        "fraction of banks trained per round": cfg.federation.fraction_train,
        "stragglers": ", ".join(f"{b.name} ({b.work:.0%} of the work)" for b in spec.banks if b.work < 1) or "none",
        "wall time (s)": f"{summary.seconds:.1f}",
        "encryption": f"{str(cfg.privacy.he.get('scheme', 'bfv')).upper()} (TenSEAL): the operator adds ciphertexts; "
        "the last round's test metrics are of the final global decrypted by a bank (bf16-rounded)"
        if he_enabled(cfg)
        else "none",
    }
    up, down = wire_bytes_per_parameter(history, _num_params(run_dir / FINAL_STATE))
    settings["model state on the wire, bytes per parameter per bank (up / down; fp32: 4)"] = f"{up:.2f} / {down:.2f}"
    text = markdown(
        f"Federated simulation: {cfg.data.name}, {cfg.strategy.name}",
        settings,
        history,
        summary.baselines,
        privacy=_privacy_section(cfg, spec, history, run_dir),
        choice=choice,
        per_bank=_per_bank_section(cfg, summary),
        progress=progress_section(summary.progress) if summary.progress else [],
    )
    task: dict[str, object] = {"task_metrics": task_metric_rows(history), "published_round": choice.to_dict()}
    if summary.per_bank:
        task["per_bank"] = per_bank_summary(summary.per_bank, personalize_settings(cfg))
    if summary.baselines:
        task["federated_over_pooled"] = summary.pooled_ratio()
    (run_dir / SUMMARY_FILE).write_text(json.dumps(jsonable(summary.to_dict() | task), indent=2), encoding="utf-8")
    path = run_dir / REPORT
    path.write_text(text, encoding="utf-8")
    return path


def _per_bank_section(cfg: DictConfig, summary: SimulationSummary) -> list[str]:
    if not summary.per_bank:
        return []
    ratio = summary.pooled_ratio()
    pooled = [] if math.isnan(ratio) else [f"Global test set: federated / pooled accuracy = {ratio:.3f}."]
    return markdown_section(summary.per_bank, personalize_settings(cfg)) + pooled


def _privacy_section(cfg: DictConfig, spec: FederationSpec, history: History, run_dir: Path) -> list[str]:
    """Under DP: the epsilon plot and the report's section on it (each bank's budget from the config)."""
    dp = dp_round_config(cfg)
    if dp is None:
        return []
    budgets = {bank.name: DPSettings.from_mapping(dp, bank=bank.name).target_epsilon for bank in spec.banks}
    plot_epsilon(history, budgets, run_dir / EPSILON_PLOT)
    return epsilon_section(history, budgets)


def _num_params(state_file: Path) -> int:
    if not state_file.is_file():
        return 0
    return sum(int(np.prod(value.shape)) for value in load_file(str(state_file)).values())


def print_summary(summary: SimulationSummary, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{summary.strategy}: global model per round ({len(summary.banks)} banks)")
    for column in ("round", "test acc", "test loss", "valid acc", "train loss", "banks ok/failed", "seconds"):
        table.add_column(column, justify="right")
    for r in summary.rounds:
        table.add_row(
            str(r.round),
            figure(r.test_accuracy),
            figure(r.test_loss),
            figure(r.valid_accuracy),
            figure(r.train_loss),
            f"{r.banks_ok}/{r.banks_failed}",
            figure(r.seconds, 1),
        )
    console.print(table)
    if summary.baselines:
        base = Table(title="Baselines on the global test set (same step budget)")
        for column in ("model", "steps", "test acc", "test macro-F1"):
            base.add_column(column, justify="right")
        base.add_row("federated", "-", figure(summary.final.test_accuracy), "-")
        for b in summary.baselines:
            label = "centralized" if b.kind == CENTRALIZED else f"{b.kind} {b.bank}"  # local-only or classical
            base.add_row(label, str(b.steps), figure(b.test["accuracy"]), figure(b.test.get("macro_f1", math.nan)))
        local = summary.baselines
        base.add_row("mean local-only", "-", figure(mean_local(local)), figure(mean_local(local, "macro_f1")))
        console.print(base)
    if summary.per_bank:
        _print_per_bank(summary, console)
    for line in progress_lines(summary.progress) if summary.progress else []:
        console.print(line)
    if summary.published:
        console.print(f"published: {summary.published}", soft_wrap=True)
    console.print(f"report: {summary.run_dir / REPORT}", soft_wrap=True)


def _print_per_bank(summary: SimulationSummary, console: Console) -> None:
    table = Table(title="Each bank on its own test split (accuracy)")
    for column in ("bank", "global", "personalised", "pooled", "alone"):
        table.add_column(column, justify="right")
    for row in summary.per_bank:
        table.add_row(row.bank, figure(row.global_), figure(row.personalised), figure(row.pooled), figure(row.alone))
    console.print(table)
    for line in verdict_lines(summary.per_bank):
        console.print(line)
    if not math.isnan(ratio := summary.pooled_ratio()):
        console.print(f"federated / pooled on the global test set: {ratio:.3f}")


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Returns the final test accuracy, so Hydra sweepers can optimise it.

    Ctrl-C or `kill` ends it with 130 or 143 and one line, once the simulation's SuperLink, Flower
    processes and Ray are stopped (simulations/flower_run.py).
    """
    try:
        with sigterm_as_interrupt():
            summary = simulate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (CheckpointError, DataError, RayClusterError) as error:  # the run folder, data or cluster: one line
        sys.exit(f"fingpt-sim: error: {error}")
    except KeyboardInterrupt as stop:
        print("fingpt-sim: stopped; the simulation's processes have been ended", file=sys.stderr)
        sys.exit(exit_code_of(stop))
    print_summary(summary)
    return summary.final.test_accuracy


if __name__ == "__main__":
    main()
