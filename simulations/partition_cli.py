"""`fingpt-partition`: deal a data set out to banks and show who holds what (table, CSV, heat-map).

fingpt-partition data=tfns federation=dirichlet federation.alpha=0.3 federation.num_banks=10
fingpt-partition data=credit_taiwan federation.key=EDUCATION

Bad data and bad overrides end in one line on stderr (`fingpt-partition: error: ...`) and exit code 2;
only a bug shows a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console

from fingpt_federated.conf import CONFIG_DIR, save_resolved_config
from fingpt_federated.data.federation_layout import FederationLayout, prepare_federation
from fingpt_federated.simulations.partition_report import (
    render_table,
    save_heatmap,
    write_csv,
)


def report(layout: FederationLayout, out_dir: Path, title: str, console: Console) -> dict[str, Path]:
    """Print the per-bank table (train + validation rows) and write its CSV and heat-map."""
    counts = layout.train_counts + layout.valid_counts
    console.print(render_table(counts, layout.bank_names, layout.class_names, title=title))
    return {
        "csv": write_csv(counts, layout.bank_names, layout.class_names, out_dir / "banks.csv"),
        "heatmap": save_heatmap(counts, layout.bank_names, layout.class_names, out_dir / "banks_heatmap.png", title),
    }


def describe(cfg: DictConfig) -> str:
    fed = cfg.federation
    how = f"{fed.partitioner}"
    if fed.partitioner == "natural":
        how += f" by {fed.key}"
    elif fed.partitioner in ("dirichlet", "quantity"):
        how += f" alpha={fed.alpha}"
    return f"{cfg.data.name}: {how}, seed {cfg.seed}"


EXIT_USAGE = 2
USER_ERRORS = (HydraException, OmegaConfBaseException, ValueError, KeyError, OSError)  # DataError is a ValueError


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def partition(cfg: DictConfig) -> None:
    try:
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        save_resolved_config(cfg, out_dir)
        console = Console()
        layout = prepare_federation(cfg, out_dir)
        files = report(layout, out_dir, describe(cfg), console)
    except USER_ERRORS as error:  # here, before Hydra's job runner adds its "Error executing job" line
        refuse(error)
    console.print(
        f"{len(layout.bank_dirs)} banks written under {out_dir / 'banks'}; global test set: {layout.test_dir}"
    )
    for kind, path in files.items():
        console.print(f"{kind}: {path}")


def refuse(error: BaseException) -> NoReturn:
    print(f"fingpt-partition: error: {one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def one_line(error: BaseException) -> str:
    """An error and its cause as one line: Hydra's messages span lines (options, search path, full_key)."""
    parts = []
    for part in (error, error.__cause__):
        text = str(part).strip() if part is not None else ""
        if text:
            parts.append(text.splitlines()[0].strip())
    options = getattr(error, "options", None)  # a missing config group option: say which exist
    if options:
        parts.append(f"options: {', '.join(options)}")
    return ": ".join(parts) or type(error).__name__


def main() -> None:
    """The console script: Hydra's app, with its multi-line error reports turned into one line."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's trimmed traceback printer
    try:
        partition()
    except USER_ERRORS as error:  # composing the config: bad overrides, unknown groups, wrong types
        refuse(error)


if __name__ == "__main__":
    main()
