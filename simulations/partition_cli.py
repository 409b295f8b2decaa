"""`fingpt-partition`: deal a data set out to banks and show who holds what (table, CSV, heat-map).

fingpt-partition data=tfns federation=dirichlet federation.alpha=0.3 federation.num_banks=10
fingpt-partition data=credit_taiwan federation.key=EDUCATION
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
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


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    save_resolved_config(cfg, out_dir)
    console = Console()
    layout = prepare_federation(cfg, out_dir)
    files = report(layout, out_dir, describe(cfg), console)
    console.print(
        f"{len(layout.bank_dirs)} banks written under {out_dir / 'banks'}; global test set: {layout.test_dir}"
    )
    for kind, path in files.items():
        console.print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
