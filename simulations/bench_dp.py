"""What differential privacy costs: step time, and accuracy at a given epsilon.

    python -m fingpt_federated.simulations.bench_dp step-time [--model minilm] [--steps 30] [--warmup 3]
                                                        [--device cpu]
    python -m fingpt_federated.simulations.bench_dp utility [OVERRIDE ...] [--epsilons 1 3 8] [--seeds 0 1]
                                                        [--out DIR]
    python -m fingpt_federated.simulations.bench_dp credit [OVERRIDE ...] [--epsilons 8] [--out DIR]

`step-time`: one DP-SGD step (Opacus hooks: per-sample gradients of the LoRA adapters and head,
clipping, noise, accounting) against one ordinary step, same model, same physical batch (32
texts of TFNS, else synthetic news), AdamW. So that other jobs on a shared machine slow both
alike, the two kinds alternate step by step, and each step is timed in CPU time of this process
(one thread), not wall time; medians are reported. DP batches are Poisson (expected 32), so time
per example is reported too. `--device cuda` (or auto) times the steps on the GPU instead, in wall
time after a synchronisation, since CPU time does not see the kernels.

`utility`: the privacy-utility table, TFNS over 10 banks split Dirichlet(0.3), FedAvg with the
logit-adjusted loss (under DP on label counts released once with noise), 8 rounds: final
global test accuracy (and its ratio to the run without DP, which trains with DP's batch size),
macro-F1 and ROC AUC (binary tasks) without DP and at each target epsilon, with
the most epsilon any bank spent and how many bank-rounds were declined. `credit`: the same
for Taiwan credit default (one bank per education segment), where ROC AUC is the figure to read.
Each has its own DP recipe (TFNS_DP, CREDIT_DP below: DP hyperparameters depend on the data);
the measured results are in docs/privacy-utility.md. Both run the full simulation
(fingpt_federated.simulations.sim, Flower's simulation engine) once per row, so they take as long
as real federated runs; Hydra overrides before the options change the setting (e.g.
`model=tiny_encoder federation.rounds=2 strategy.local_steps=5` for a quick look).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import torch
from omegaconf import OmegaConf
from torch.nn import functional as F

from fingpt_federated.conf import compose_config
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.batching import make_loader
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.federation_layout import materialize_data_config
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import resolve_device
from fingpt_federated.model.state import trainable_parameters
from fingpt_federated.privacy.dp_budget import PrivacyLedger, ledger_path
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.dp_training import make_private
from fingpt_federated.server.history import CENTRAL, FEDERATION, History
from fingpt_federated.server.run_folder import METRICS_JSON, RESOLVED_CONFIG

TARGET_RATIO = 1.15


def _config(*overrides: str):
    return compose_config(overrides)


def _texts(work: Path, rows: int) -> BankDataset:
    """TFNS when the shared data is there, else the synthetic news of the default config."""
    for data in ("tfns", "synthetic_news"):
        cfg = config_dict(_config(f"data={data}").data)
        try:
            dataset = load_dataset(materialize_data_config(cfg, work))
        except (FileNotFoundError, DataError):  # the shared data sets are not on every machine
            continue
        return dataset.subset(list(range(min(rows, len(dataset)))))
    raise FileNotFoundError("neither TFNS nor synthetic news could be loaded")


def _cycle(loader) -> Iterator:
    while True:
        yield from loader


class StepTime(TypedDict):
    plain_s_per_step: float
    dp_s_per_step: float
    ratio_per_step: float
    ratio_per_example: float
    steps_timed: int
    device: str


def step_time(model_name: str, steps: int, warmup: int, batch: int, threads: int, device: str = "cpu") -> StepTime:
    """Median seconds per step and per example, DP and not, and their ratios."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    target = resolve_device(device)
    clock = _cuda_clock if target.type == "cuda" else time.process_time
    with tempfile.TemporaryDirectory() as work:
        data = _texts(Path(work), rows=4096)
        model_cfg = config_dict(_config(f"model={model_name}").model)
        plain, tokenizer = build_model(model_cfg, data.num_classes, 0)
        plain.to(target)
        private_model = copy.deepcopy(plain)
        lr = 5e-4

        plain.train()
        plain_opt = torch.optim.AdamW(list(trainable_parameters(plain).values()), lr=lr)
        plain_batches = _cycle(make_loader(data, tokenizer, plain.config.max_length, batch, shuffle=True))

        settings = DPSettings(
            enabled=True,
            target_epsilon=None,
            noise_multiplier=1.0,
            accountant="rdp",
            logical_batch_size=batch,
            physical_batch_size=batch,
        )
        ledger = PrivacyLedger.open(
            ledger_path(work, "bench"), run="bench", accountant="rdp", delta=settings.delta, target_epsilon=None
        )
        dp_opt = torch.optim.AdamW(list(trainable_parameters(private_model).values()), lr=lr)
        loader = make_loader(data, tokenizer, private_model.config.max_length, batch, shuffle=True)
        total = steps + warmup
        timings: dict[str, list[float]] = {"plain": [], "dp": [], "plain_ex": [], "dp_ex": []}
        with make_private(private_model, dp_opt, loader, settings, ledger, round_label="bench", steps=total) as private:
            dp_batches = _cycle(private.loader)

            def plain_step() -> int:
                b = next(plain_batches).to(target)
                loss = F.cross_entropy(plain(**b.inputs()), b.labels)
                plain_opt.zero_grad(set_to_none=True)
                loss.backward()
                plain_opt.step()
                return len(b)

            def dp_step() -> int:
                b = next(dp_batches)
                while b is None:  # an empty Poisson batch (rare at this size): not a timed step
                    private.empty_step()
                    private.optimizer.zero_grad(set_to_none=True)
                    b = next(dp_batches)
                b = b.to(target)
                loss = F.cross_entropy(private_model(**b.inputs()), b.labels)
                private.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                private.optimizer.step()
                return len(b)

            for round_ in range(steps + warmup):  # the kinds alternate step by step
                for name, step in (("plain", plain_step), ("dp", dp_step)):
                    started = clock()
                    examples = step()
                    seconds = clock() - started
                    if round_ >= warmup:
                        timings[name].append(seconds)
                        timings[f"{name}_ex"].append(seconds / examples)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "plain_s_per_step": medians["plain"],
        "dp_s_per_step": medians["dp"],
        "ratio_per_step": medians["dp"] / medians["plain"],
        "ratio_per_example": medians["dp_ex"] / medians["plain_ex"],
        "steps_timed": len(timings["dp"]),
        "device": str(target),
    }


def _cuda_clock() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


TFNS_DIRICHLET = (
    "data=tfns",
    "federation=dirichlet",
    "federation.num_banks=10",
    "federation.alpha=0.3",
    "federation.rounds=8",
    "strategy=fedavg",
    "strategy.local_steps=5",
    "model.train.lr=2e-3",
    "model.train.logit_adjustment=1.0",
    "model.train.progress=false",
    "publish.enabled=false",
)
CREDIT_SEGMENTS = (
    "+experiment=credit_parity",  # features only, one bank per EDUCATION value, FedAvg (conf/experiment/)
    "baseline=false",
    "personalize.steps=0",  # no own test split held out: the banks keep all their rows
    "model.train.lr=5e-3",  # the row without DP trains DP's batches of 512: at the preset's 5e-4 it barely moves
    "model.train.progress=false",
    "publish.enabled=false",
)
TFNS_DP = (
    "privacy.dp.logical_batch_size=128",
    "privacy.dp.optimizer=sgd",
    "privacy.dp.lr=0.5",
    "privacy.dp.max_grad_norm=2.0",
)
"""The TFNS DP rows' recipe: expected Poisson batch 128 (also the batch of the row without DP: 128 keeps
a round's compute near FedAvg's 10 steps of 32), SGD with momentum at lr 0.5, clipping bound 2.
Why, and every alternative measured: docs/privacy-utility.md."""
CREDIT_DP = (
    "privacy.dp.logical_batch_size=512",
    "privacy.dp.physical_batch_size=512",
    "privacy.dp.lr=1e-2",
    "privacy.dp.max_grad_norm=1.0",
)
"""The credit DP rows' recipe, also credit_parity's: AdamW at dp.lr 1e-2, expected Poisson batches of 512, clip 1
(two passes a round, from the preset). Why, and the levers measured: docs/privacy-utility.md "Taiwan credit"."""


def utility(
    base: tuple[str, ...],
    recipe: tuple[str, ...],
    epsilons: list[float],
    out: Path,
    overrides: list[str],
    seeds: tuple[int, ...] = (0,),
) -> list[dict[str, float]]:
    """One simulated federation without DP and one per target epsilon, per seed; final central test metrics.

    The row without DP trains with DP's batch size (dp.logical_batch_size) and its own learning
    rate (train.lr), each regime at the rate that suits it. A seed sets the model's initialisation
    and the training order (`model.seed`, `model.train.seed`), not the banks' data; DP noise and
    sampling draw from the OS whatever the seed. With several seeds a mean row follows each
    setting's rows, its ratio the mean accuracy over the mean without DP. A run folder in `out`
    that holds a finished run of the same row is read instead of run again.
    """
    dp = _config(*base, "privacy=dp", *recipe, *overrides).privacy.dp
    rows: list[dict[str, float]] = []
    no_dp: dict[int, float] = {}
    for epsilon in [None, *epsilons]:
        if epsilon is None:
            privacy = ["privacy=none", f"model.train.batch_size={dp.logical_batch_size}"]
        else:
            privacy = ["privacy=dp", *recipe, f"privacy.dp.target_epsilon={epsilon}"]
        label = "no-dp" if epsilon is None else f"eps-{epsilon:g}"
        runs = []
        for seed in seeds:
            seeded = [*overrides, f"model.seed={seed}", f"model.train.seed={seed}"]
            run_dir = out / (label + (f"-seed{seed}" if seed else ""))
            row = _utility_row(_config(*base, *privacy, *seeded), run_dir, epsilon)
            no_dp.setdefault(seed, row["accuracy"])
            runs.append({**row, "seed": seed, "ratio": row["accuracy"] / no_dp[seed]})
            print(_row(runs[-1]), flush=True)
        if len(seeds) > 1:
            runs.append(_mean_row(runs, statistics.fmean(no_dp.values())))
            print(_row(runs[-1]), flush=True)
        rows += runs
    return rows


def _mean_row(runs: list[dict[str, float]], no_dp_accuracy: float) -> dict[str, float]:
    """The mean over seeds of one setting's rows; `seed` NaN marks it, `accuracy_sd` is the spread."""
    mean = {key: statistics.fmean(run[key] for run in runs) for key in runs[0] if key != "seed"}
    mean["max_bank_epsilon"] = max(run["max_bank_epsilon"] for run in runs)
    mean["declined"] = sum(run["declined"] for run in runs)
    mean["accuracy_sd"] = statistics.stdev(run["accuracy"] for run in runs)
    return {**mean, "seed": math.nan, "ratio": mean["accuracy"] / no_dp_accuracy}


def _utility_row(cfg, run_dir: Path, epsilon: float | None) -> dict[str, float]:
    from fingpt_federated.simulations.sim import (  # the simulation engine is only needed here
        SUMMARY_FILE,
        simulate,
    )

    if not _finished(run_dir, cfg):
        simulate(cfg, run_dir, echo=False)
    history = History.from_json((run_dir / METRICS_JSON).read_text(encoding="utf-8"))
    final = history.select(CENTRAL)[-1].metrics
    spent = [r.metrics["epsilon"] for r in history.select("train") if "epsilon" in r.metrics and r.bank != FEDERATION]
    return {
        "target_epsilon": math.inf if epsilon is None else epsilon,
        "accuracy": final["accuracy"],
        "macro_f1": final.get("macro_f1", math.nan),
        "roc_auc": final.get("roc_auc", math.nan),
        "max_bank_epsilon": max(spent, default=math.nan),
        "declined": len(history.select("train", status="declined")),
        "seconds": json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))["seconds"],
    }


def _finished(run_dir: Path, cfg) -> bool:
    """Whether `run_dir` holds a finished run of exactly `cfg` (its summary and resolved config)."""
    from fingpt_federated.simulations.sim import SUMMARY_FILE

    resolved = run_dir / RESOLVED_CONFIG
    if not (run_dir / SUMMARY_FILE).is_file() or not resolved.is_file():
        return False
    return OmegaConf.to_container(OmegaConf.load(resolved)) == OmegaConf.to_container(cfg, resolve=True)


def _row(row: dict[str, float]) -> str:
    target = "no DP" if math.isinf(row["target_epsilon"]) else f"{row['target_epsilon']:g}"
    seed = f"mean (sd {row['accuracy_sd']:.4f})" if math.isnan(row["seed"]) else f"{row['seed']:g}"
    return (
        f"| {target:>6} | {seed} | {row['accuracy']:.4f} | {row['ratio']:.3f} | {row['macro_f1']:.4f} | "
        f"{row['roc_auc']:.4f} | {row['max_bank_epsilon']:.3f} | {row['declined']} | {row['seconds']:.0f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    timing = commands.add_parser("step-time", help="DP step time against a non-private step")
    timing.add_argument("--model", default="minilm")
    timing.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    timing.add_argument("--warmup", type=int, default=3, help="untimed steps of each kind first")
    timing.add_argument("--batch", type=int, default=32)
    timing.add_argument("--threads", type=int, default=1)
    timing.add_argument("--device", default="cpu", help="cpu, cuda or auto (cuda when present)")
    for name, defaults in (("utility", [1.0, 3.0, 8.0]), ("credit", [8.0])):
        sub = commands.add_parser(name, help=f"{name} of DP federations against no DP (full simulations)")
        sub.add_argument("--epsilons", type=float, nargs="+", default=defaults)
        sub.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            default=[0],
            help="model seeds (initialisation, training order); several: a mean row per setting",
        )
        sub.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
        sub.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. federation.rounds=3")
    args = parser.parse_args(argv)
    if args.command in ("utility", "credit"):
        base = TFNS_DIRICHLET if args.command == "utility" else CREDIT_SEGMENTS
        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            print(f"{args.command}: {' '.join([*base, *args.overrides])}")
            print(
                "| target epsilon | seed | test accuracy | vs no DP | macro-F1 | ROC AUC | max bank epsilon "
                "| declined | seconds |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            utility(
                base,
                TFNS_DP if args.command == "utility" else CREDIT_DP,
                args.epsilons,
                out,
                args.overrides,
                tuple(args.seeds),
            )
        return
    if args.command == "step-time":
        result = step_time(args.model, args.steps, args.warmup, args.batch, args.threads, args.device)
        print(
            f"model {args.model}, batch {args.batch}, {result['steps_timed']} timed steps of each kind, "
            f"on {result['device']} ({args.threads} CPU thread(s))"
        )
        print(f"  non-private step: {result['plain_s_per_step']:.3f} s")
        print(f"  DP-SGD step:      {result['dp_s_per_step']:.3f} s")
        verdict = "within" if result["ratio_per_step"] <= TARGET_RATIO else "ABOVE"
        print(
            f"  DP / non-DP: {result['ratio_per_step']:.3f}x per step, {result['ratio_per_example']:.3f}x per "
            f"example ({verdict} the {TARGET_RATIO}x target)"
        )


if __name__ == "__main__":
    main()
