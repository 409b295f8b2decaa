"""Replay a backdoor federation of `fingpt-audit` offline, to compare aggregation rules and see why they leak.

    python -m fingpt_federated.simulations.attacks.backdoor_replay RUN/backdoor_none fedavg trim0.2 krum
    python -m fingpt_federated.simulations.attacks.backdoor_replay RUN/backdoor_none fedmedian --analyse
    python -m fingpt_federated.simulations.attacks.backdoor_replay RUN/backdoor_none fedavg --honest

Every round, every bank's local round is repeated from the current global state (bank_update.py: the
same `train_local`, data and seeds as the bank), so one federation's banks, data and test set are tried
under any rule without Flower's start-up, and bank 1's update can be compared with the honest ones. The
rules are Flower's own pieces where Flower has them (`select_multikrum`, `trim_mean`, Bulyan's
`aggregate_n_closest_weights`); norm bounding and noise compute what Flower's server-side fixed clipping
does (clip each update to the bound, Gaussian noise of std sigma x bound / banks on every value), with
the bound the round's median update norm times a factor. A rule is `[PRE+...]AGG[~SIGMA]`:

- PRE: `clipmed[F]` (clip to F x the round's median update norm, F 1 by default), `equal` (equal weights);
- AGG: `fedavg` (example-weighted), `fedmedian`, `trim<BETA>`, `krum`, `mkrum<M>`, `bulyan` (f = 1);
- `~SIGMA`: Gaussian noise on the aggregate, sigma as Flower's noise multiplier.

The replay reproduces the Flower runs to the last digit (FedAvg, FedMedian, FedTrimmedAvg, Krum and
Bulyan at 1 of 10 banks, docs/privacy-utility.md). `--honest` trains bank 1 without its backdoor (the
floor); `--analyse` prints, per round, bank 1's update norm and cosine to the honest mean against the
honest banks' spread, and per parameter group how much of bank 1's push the coordinate-wise median keeps
and what the backdoor's success is with bank 1's FedAvg share added back in that group only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from omegaconf import OmegaConf

from fingpt_federated.client.hostile import train_data
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.simulations.attacks import backdoor
from fingpt_federated.simulations.attacks.bank_update import replayed_update
from fingpt_federated.simulations.attacks.scoring import Scorer

State = dict[str, np.ndarray]
HOSTILE = 1  # fingpt-audit's backdoor bank in the quick and tfns presets
KRUM_F = 1  # hostile banks Krum and Bulyan tolerate


def flat(state: State) -> np.ndarray:
    return np.concatenate([state[k].ravel() for k in sorted(state)])


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def selected(deltas: list[State], sent: State, weights: np.ndarray, chosen: int) -> list[int]:
    """The banks Flower's (Multi)Krum selection keeps, `chosen` of them, with f = KRUM_F."""
    records = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array((sent[k] + d[k]).astype(np.float32)) for k in sent}),
                "metrics": MetricRecord({"num-examples": int(w)}),
            }
        )
        for d, w in zip(deltas, weights, strict=True)
    ]
    kept = select_multikrum(records, KRUM_F, chosen)
    return [i for i, record in enumerate(records) if any(record is k for k in kept)]


def combine(agg: str, deltas: list[State], weights: np.ndarray, sent: State) -> State:
    """The aggregate update of rule `agg` (no pre-processing, no noise)."""
    keys = list(sent)
    stack = {k: np.stack([d[k] for d in deltas]) for k in keys}
    if agg == "fedavg":
        return {k: np.tensordot(weights / weights.sum(), stack[k], 1) for k in keys}
    if agg == "fedmedian":
        return {k: np.median(stack[k], axis=0) for k in keys}
    if agg.startswith("trim"):
        return {k: trim_mean(stack[k], float(agg[4:])) for k in keys}
    if agg == "krum" or agg.startswith("mkrum"):
        banks = selected(deltas, sent, weights, 1 if agg == "krum" else int(agg[5:]))
        share = weights[banks] / weights[banks].sum()
        return {k: np.tensordot(share, stack[k][banks], 1) for k in keys}
    if agg == "bulyan":
        theta = len(deltas) - 2 * KRUM_F
        banks = selected(deltas, sent, weights, theta)
        chosen = [[stack[k][i] for k in keys] for i in banks]
        median = [np.median(np.stack(values), axis=0) for values in zip(*chosen, strict=True)]
        return dict(zip(keys, aggregate_n_closest_weights(median, chosen, theta - 2 * KRUM_F), strict=True))
    raise ValueError(f"unknown aggregation {agg!r}")


def aggregate(rule: str, sent: State, replies: list[State], examples: np.ndarray, rng: np.random.Generator) -> State:
    """The new global state under `rule` ([PRE+...]AGG[~SIGMA], see the module docstring)."""
    *pre, last = rule.split("+")
    agg, _, sigma = last.partition("~")
    deltas = [{k: reply[k] - sent[k] for k in sent} for reply in replies]
    norms = np.array([np.linalg.norm(flat(d)) for d in deltas])
    bound, weights = float(np.median(norms)), examples.astype(float)
    for step in pre:
        if step.startswith("clipmed"):
            bound *= float(step[7:] or 1.0)
            deltas = [{k: v * min(1.0, bound / n) for k, v in d.items()} for d, n in zip(deltas, norms, strict=True)]
        elif step == "equal":
            weights = np.ones_like(weights)
        else:
            raise ValueError(f"unknown pre-processing {step!r}")
    update = combine(agg, deltas, weights, sent)
    std = float(sigma or 0.0) * bound / len(replies)
    return {
        k: (sent[k] + update[k] + (rng.normal(0.0, std, update[k].shape) if std else 0.0)).astype(np.float32)
        for k in sent
    }


def group(key: str) -> str:
    """A parameter's group: the head, or LoRA A/B of one module of one layer (or the pooler)."""
    if key.startswith("head"):
        return "head"
    factor = "A" if "lora_A" in key else "B"
    if "pooler" in key:
        return f"pooler.{factor}"
    layer = key.split("layer.")[1].split(".")[0]
    for marker, name in (("attention.output", "attn_out"), ("intermediate", "inter"), ("output.dense", "out")):
        if marker in key:
            return f"L{layer}.{name}.{factor}"
    return f"L{layer}.{key.split('attention.self.')[1].split('.')[0]}.{factor}"


def analyse(sent: State, replies: list[State], examples: np.ndarray, rate: Callable[[State], str], rnd: int) -> None:
    """Bank HOSTILE's update against the honest ones in this round (see the module docstring)."""
    keys = list(sent)
    deltas = [{k: r[k] - sent[k] for k in keys} for r in replies]
    vectors = [flat(d) for d in deltas]
    honest = [i for i in range(len(replies)) if i != HOSTILE]
    norms = np.array([np.linalg.norm(v) for v in vectors])
    mean = np.mean([vectors[i] for i in honest], axis=0)
    others = [cosine(vectors[i], np.mean([vectors[j] for j in honest if j != i], axis=0)) for i in honest]
    spread = norms[honest]
    print(
        f"round {rnd}: bank {HOSTILE} norm {norms[HOSTILE]:.2f}, honest min/median/max "
        f"{spread.min():.2f}/{np.median(spread):.2f}/{spread.max():.2f}; cosine to the honest mean "
        f"{cosine(vectors[HOSTILE], mean):.3f}, honest to the others' {min(others):.3f}/{np.median(others):.3f}/"
        f"{max(others):.3f}"
    )
    share = examples / examples.sum()
    full = {k: sent[k] + sum(share[i] * deltas[i][k] for i in range(len(replies))) for k in keys}
    base = {k: sent[k] + np.mean([deltas[i][k] for i in honest], axis=0) for k in keys}
    print(f"  honest mean: {rate(base)}; FedAvg with bank {HOSTILE}: {rate(full)}")
    for name in sorted({group(k) for k in keys}):
        part = [k for k in keys if group(k) == name]
        honest_median = {k: np.median(np.stack([deltas[i][k] for i in honest]), axis=0) for k in part}
        moved = np.concatenate(
            [(np.median(np.stack([d[k] for d in deltas]), axis=0) - honest_median[k]).ravel() for k in part]
        )
        push = np.concatenate([(deltas[HOSTILE][k] - honest_median[k]).ravel() for k in part])
        kept = float(moved @ push / (push @ push)) if push @ push > 0 else 0.0
        only = {k: full[k] if k in part else base[k] for k in keys}
        print(
            f"  {name:12s} median keeps {kept:.3f} of its push; bank {HOSTILE}'s share in this group only: {rate(only)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a fingpt-audit sub-run (e.g. RUN/backdoor_none)")
    parser.add_argument("rules", nargs="+", help="aggregation rules, e.g. fedavg trim0.2 clipmed+fedavg~0.03")
    parser.add_argument("--honest", action="store_true", help="bank 1 trains without its backdoor (the floor)")
    parser.add_argument("--target", type=int, default=0, help="the backdoor's target class")
    parser.add_argument("--trigger", default=backdoor.TRIGGER, help="the trigger phrase the run's backdoor bank used")
    parser.add_argument("--analyse", action="store_true", help="bank 1's update against the honest ones, per round")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run / "resolved_config.yaml")
    model_cfg = config_dict(cfg.model)
    test = load_bank(args.run / "federation" / "test").train
    texts = list(test.texts or [])
    scorer = Scorer(model_cfg, test.class_names)
    folders = sorted((args.run / "federation" / "banks").glob("bank_*"))
    behaviour = "" if args.honest else f"backdoor:{args.target}:{args.trigger}"
    banks = [train_data(behaviour if i == HOSTILE else "", load_bank(f)) for i, f in enumerate(folders)]
    examples = np.array([len(b.train) for b in banks])
    epochs, steps = int(cfg.strategy.local_epochs), cfg.strategy.get("local_steps")

    def rate(state: State) -> str:
        clean = scorer.predictions(state, texts)
        r = backdoor.rates(
            clean, scorer.predictions(state, backdoor.triggered(texts, args.trigger)), test.labels, args.target
        )
        return (
            f"success {r.success_rate:.3f} ({r.counted}, <= {r.success_upper:.3f}), target rate "
            f"{r.triggered_target_rate:.3f}/{r.untriggered_target_rate:.3f}, clean accuracy "
            f"{float((clean == test.labels).mean()):.3f}"
        )

    for rule in args.rules:
        rng = np.random.default_rng(args.seed)
        state = {k: v.numpy() for k, v in scorer.initial.items()}
        for rnd in range(1, int(cfg.federation.rounds) + 1):
            replies = [
                replayed_update(model_cfg, state, b, epochs, None if steps is None else int(steps)) for b in banks
            ]
            if args.analyse:
                analyse(state, replies, examples, rate, rnd)
            state = aggregate(rule, state, replies, examples, rng)
            print(f"{rule} ({'honest' if args.honest else 'backdoor'}) round {rnd}: {rate(state)}", flush=True)


if __name__ == "__main__":
    main()
