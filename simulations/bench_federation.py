"""Benchmarks of the simulated federation; prints a table and writes bench_federation.json.

    python -m fingpt_federated.simulations.bench_federation                  # all three
    python -m fingpt_federated.simulations.bench_federation --only scale     # one of: rounds, scale, tfns

- rounds: wall time of a round (3 banks, tiny encoder, 3 rounds): round 1 includes starting the
  Ray actors and building the model in them, later rounds are the steady state.
- scale: 100 simulated banks, 10 sampled per round (tiny encoder, 2 rounds).
- tfns: TFNS split over 10 banks by Dirichlet(0.3) (../shared/data): FedAvg and FedProx against
  centralized training and the mean bank alone, all with the same optimizer-step budget
  (`--rounds` rounds of at most `--local-steps` steps per bank), MiniLM by default. With the
  defaults that is 500 steps of batch 32 per contender: about 1.5 hours on 2 busy CPU cores
  (3 s a step measured), minutes on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fingpt_federated.conf import compose_config, shared_data_root
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.server.history import CENTRAL, History
from fingpt_federated.server.run_folder import FEDERATION_SPEC, METRICS_JSON
from fingpt_federated.simulations.baselines import (
    CENTRALIZED,
    mean_local,
    run_baselines,
)
from fingpt_federated.simulations.sim import SimulationSummary, simulate
from fingpt_federated.strict_json import jsonable

BENCHES = ("rounds", "scale", "tfns")


def config(*overrides: str) -> DictConfig:
    return compose_config(overrides)


def timed(cfg: DictConfig, run_dir: Path) -> tuple[SimulationSummary, float]:
    started = time.perf_counter()
    summary = simulate(cfg, run_dir, echo=False)
    return summary, time.perf_counter() - started


def round_times(summary: SimulationSummary) -> dict[str, float]:
    seconds = [r.seconds for r in summary.rounds[1:]]
    warm = [s for s in seconds[1:] if not math.isnan(s)]
    return {"first_round_s": seconds[0], "later_rounds_s": sum(warm) / len(warm) if warm else math.nan}


def bench_rounds(out: Path) -> dict:
    cfg = config(
        "model=tiny_encoder",
        "federation=iid",
        "federation.num_banks=3",
        "federation.rounds=3",
        "strategy.local_steps=10",
    )
    summary, seconds = timed(cfg, out / "rounds")
    return {"banks": 3, "sampled": 3, "run_s": seconds, **round_times(summary)}


def bench_scale(out: Path) -> dict:
    cfg = config(
        "model=tiny_encoder",
        "federation=iid",
        "federation.num_banks=100",
        "federation.min_size=5",
        "federation.rounds=2",
        "federation.fraction_train=0.1",
        "federation.fraction_evaluate=0.1",
        "strategy.local_steps=5",
    )
    summary, seconds = timed(cfg, out / "scale")
    return {
        "banks": 100,
        "sampled": summary.final.banks_ok,
        "run_s": seconds,
        **round_times(summary),
        "final_test_accuracy": summary.final.test_accuracy,
    }


def bench_tfns(out: Path, rounds: int, local_steps: int, model: str, save: Callable[[dict], None]) -> dict:
    """FedAvg, FedProx, then the baselines on the same banks; `save` is called after each stage,
    so an interrupted run keeps what it measured."""
    if not (shared_data_root() / "tfns").is_dir():
        return {"skipped": f"no TFNS data under {shared_data_root()}"}
    common = [
        "data=tfns",
        f"model={model}",
        "federation=dirichlet",
        "federation.num_banks=10",
        "federation.alpha=0.3",
        f"federation.rounds={rounds}",
        f"strategy.local_steps={local_steps}",
        "model.train.progress=false",
    ]
    results: dict = {"rounds": rounds, "local_steps": local_steps, "model": model}
    for strategy in ("fedavg", "fedprox"):
        cfg = config(*common, f"strategy={strategy}")
        summary, results[f"{strategy}_s"] = timed(cfg, out / f"tfns_{strategy}")
        results["initial_accuracy"] = summary.initial.test_accuracy
        results[f"{strategy}_accuracy"] = summary.final.test_accuracy
        results[f"{strategy}_macro_f1"] = _final_macro_f1(out / f"tfns_{strategy}")
        save(results)
    results["fedprox_mu"] = float(config(*common, "strategy=fedprox").strategy.mu)
    cfg = config(*common)
    spec = FederationSpec.load(out / "tfns_fedavg" / FEDERATION_SPEC)
    baselines = run_baselines(cfg, spec, threads=1)
    results["centralized_accuracy"] = next(b.test["accuracy"] for b in baselines if b.kind == CENTRALIZED)
    results["centralized_macro_f1"] = next(b.test["macro_f1"] for b in baselines if b.kind == CENTRALIZED)
    results["mean_local_only_accuracy"] = mean_local(baselines)
    results["mean_local_only_macro_f1"] = mean_local(baselines, "macro_f1")
    save(results)
    return results


def _final_macro_f1(run_dir: Path) -> float:
    central = History.from_json((run_dir / METRICS_JSON).read_text(encoding="utf-8")).select(CENTRAL)
    return central[-1].metrics.get("macro_f1", math.nan) if central else math.nan


def print_results(results: dict) -> None:
    table = Table(title="Federation benchmarks")
    table.add_column("bench")
    table.add_column("result")
    for name, values in results.items():
        table.add_row(name, ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
    Console().print(table)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path("outputs") / "bench_federation" / time.strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--only", choices=BENCHES, action="append", help="run only these (repeatable)")
    parser.add_argument("--rounds", type=int, default=5, help="tfns: federated rounds")
    parser.add_argument("--local-steps", type=int, default=10, help="tfns: optimizer steps per bank per round")
    parser.add_argument("--model", default="minilm", help="tfns: model config (conf/model)")
    args = parser.parse_args()
    chosen = args.only or list(BENCHES)
    results: dict = {}
    path = args.out / "bench_federation.json"

    def save(name: str, values: dict) -> None:
        results[name] = values
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(jsonable(results), indent=2), encoding="utf-8")

    if "rounds" in chosen:
        save("rounds", bench_rounds(args.out))
    if "scale" in chosen:
        save("scale", bench_scale(args.out))
    if "tfns" in chosen:
        save("tfns", bench_tfns(args.out, args.rounds, args.local_steps, args.model, functools.partial(save, "tfns")))
    print_results(results)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
