"""Hydra configuration of every command, and the two helpers all of them share.

Importing this package registers the config schema (conf/schema.py) that conf/config.yaml builds
on, so every command that finds CONFIG_DIR here composes against it.
`${shared_data:PATH}` resolves PATH under the read-only real data sets: `$FINGPT_SHARED_DATA`
when set, else `../shared/data` beside the checkout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.conf.schema import check_config  # registers `base_config` in Hydra's ConfigStore

CONFIG_DIR = Path(__file__).resolve().parent
REPO_ROOT = CONFIG_DIR.parent


def shared_data_root() -> Path:
    """Where the real data sets live (they are never copied into the repository)."""
    configured = os.environ.get("FINGPT_SHARED_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


def _shared_data(relative: str) -> str:
    return str(shared_data_root() / relative)


if not OmegaConf.has_resolver("shared_data"):
    OmegaConf.register_new_resolver("shared_data", _shared_data)


def compose_config(overrides: Sequence[str] = (), job_name: str = "fingpt") -> DictConfig:
    """The root config with `overrides`, checked against the schema (outside @hydra.main commands,
    which check it through conf/config.yaml's callback)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=job_name):
        cfg = compose(config_name="config", overrides=list(overrides))
    check_config(cfg)
    return cfg


def save_resolved_config(cfg: DictConfig, out_dir: str | Path, name: str = "resolved_config.yaml") -> Path:
    """Write the fully resolved config beside a run's outputs, so the run can be reproduced."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
    return path
