"""Centralized benchmark of the hybrid model on the real data sets (one bank holding everything).

    python -m fingpt_federated.simulations.bench_centralized tfns
    python -m fingpt_federated.simulations.bench_centralized credit_taiwan --variants fused,text,series
    python -m fingpt_federated.simulations.bench_centralized tfns model.train.epochs=1 model.lora.r=16

Prints, per variant, test accuracy, macro-F1 (and ROC-AUC for binary tasks), training steps per
second and the bytes of the federated state; writes the same as JSON with --out.
Needs ../shared/data (or $FINGPT_SHARED_DATA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from fingpt_federated.client.training import train_local
from fingpt_federated.conf import compose_config
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.loading import Splits, load_splits
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.text_length import with_max_length
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.simulations.partition_cli import one_line

VARIANTS = ("fused", "text", "series")
PROG = "bench_centralized"
CONFIG_ERRORS = (HydraException, OmegaConfBaseException, ValueError)  # composing: bad overrides, keys, types


def modality(data: BankDataset, variant: str) -> BankDataset:
    """The same rows with only the inputs a variant may see."""
    if variant == "text":
        return dataclasses.replace(data, series=None, mask=None, feature_names=[])
    if variant == "series":
        return dataclasses.replace(data, texts=None)
    return data


def available_variant(data: BankDataset) -> str:
    if data.texts is not None and data.series is not None:
        return "fused"
    return "text" if data.texts is not None else "series"


def run_variant(cfg: Any, splits: Any, variant: str) -> dict[str, Any]:
    train, valid, test = (modality(part, variant) for part in (splits.train, splits.valid, splits.test))
    if (variant != "text" and train.series is None) or (variant != "series" and train.texts is None):
        raise SystemExit(f"variant {variant!r} needs inputs that data={cfg.data.name} does not map")
    model, tokenizer = build_model(cfg.model, train.num_classes, train.num_features)
    train_cfg = TrainConfig.from_mapping(config_dict(cfg.model.train))
    result = train_local(model, tokenizer, train, train_cfg, valid=valid)
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, test, train_cfg.eval_batch_size)
    state = federated_state(model)
    return {
        "variant": variant,
        **{f"test_{k}": v for k, v in metrics.items()},
        "epochs_run": len(result.history),
        "steps": result.steps,
        "steps_per_second": result.steps / result.seconds,
        "examples_per_second": result.steps * train_cfg.batch_size / result.seconds,
        "eval_seconds": time.perf_counter() - started,
        "state_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "state_tensors": len(state),
        "history": result.history,
    }


def print_table(data_name: str, rows: list[dict[str, Any]], majority: float) -> None:
    table = Table(title=f"{data_name}: centralized, test set (majority-class accuracy {majority:.3f})")
    for column in ("variant", "accuracy", "macro-F1", "ROC-AUC", "epochs", "steps/s", "state bytes"):
        table.add_column(column, justify="right")
    for row in rows:
        auc = row.get("test_roc_auc")
        table.add_row(
            row["variant"],
            f"{row['test_accuracy']:.4f}",
            f"{row['test_macro_f1']:.4f}",
            "-" if auc is None else f"{auc:.4f}",
            str(row["epochs_run"]),
            f"{row['steps_per_second']:.2f}",
            f"{row['state_bytes']:,}",
        )
    Console().print(table)


def load_or_exit(overrides: list[str]) -> tuple[DictConfig, Splits]:
    """The config and its data, or one line saying what and where is wrong: exit 2 for the config, 1 for the data."""
    try:
        cfg = compose_config(overrides)
    except CONFIG_ERRORS as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    try:
        return cfg, load_splits(cfg.data)
    except DataError as error:  # a bad file, row or data config key (DataConfigError)
        sys.exit(f"{PROG}: error: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data", help="a data config name from conf/data, e.g. tfns or credit_taiwan")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.train.epochs=2")
    parser.add_argument("--variants", help=f"comma-separated subset of {VARIANTS}; default: all the data maps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_intermixed_args(argv)
    cfg, splits = load_or_exit([f"data={args.data}", *args.overrides])
    texts = {f"{part} texts": getattr(splits, part).texts for part in ("train", "valid", "test")}
    cfg = with_max_length(cfg, texts, "train texts")  # auto resolved (and in --out), long texts warned of
    variants = args.variants.split(",") if args.variants else [available_variant(splits.train)]
    if not set(variants) <= set(VARIANTS):
        parser.error(f"--variants must be a subset of {VARIANTS}")
    majority = splits.test.label_counts().max() / len(splits.test)
    rows = [run_variant(cfg, splits, variant) for variant in variants]
    print_table(cfg.data.name, rows, majority)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "data": cfg.data.name,
                    "majority_accuracy": majority,
                    "model": OmegaConf.to_container(cfg.model, resolve=True),
                    "results": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
