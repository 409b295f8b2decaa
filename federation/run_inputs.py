"""What a run works on, from its Flower run config: the Hydra config and the federation spec.

A run config comes in one of two forms, and both apps read it through this module:
- paths (`config-path`, `spec-path`, `run-dir`): `fingpt-sim` and `fingpt-server` resolve the config
  and prepare the banks before submitting the run, and point the apps at the files;
- values (`data`, `model`, `strategy`, `privacy`, `federation`: config-group choices; `rounds`;
  `overrides`: further Hydra overrides): what `flwr run .` sends, from pyproject's
  `[tool.flwr.app.config]` or `--run-config "rounds=3 model='minilm'"`. Each app composes the same
  config from them; the ServerApp and every simulated bank then prepare the same seeded federation
  (one bank per SuperNode) in a cache folder keyed by the config, the first one to finish
  publishing it atomically, as Flower's own examples let every ClientApp load its partition.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fingpt_federated.conf import compose_config
from fingpt_federated.data.federation_layout import FederationLayout, prepare_federation
from fingpt_federated.federation import protocol
from fingpt_federated.federation.federation_spec import BankSite, FederationSpec
from fingpt_federated.model.backbone import cache_dir

CONFIG_GROUPS = ("data", "model", "strategy", "privacy", "federation")
RUN_ROUNDS = "rounds"
RUN_OVERRIDES = "overrides"
SPEC_FILE = "federation_spec.json"


def uses_values(run_config: Mapping[str, Any]) -> bool:
    """True when the run config carries values (`flwr run .`), not the paths of a prepared run."""
    return not run_config.get(protocol.RUN_CONFIG_PATH)


def run_overrides(run_config: Mapping[str, Any]) -> list[str]:
    """The Hydra overrides that the run config's values stand for."""
    overrides = [f"{group}={run_config[group]}" for group in CONFIG_GROUPS if run_config.get(group)]
    if run_config.get(RUN_ROUNDS):
        overrides.append(f"federation.rounds={int(run_config[RUN_ROUNDS])}")
    return overrides + shlex.split(str(run_config.get(RUN_OVERRIDES) or ""))


def config_from_run(run_config: Mapping[str, Any], num_banks: int | None = None) -> DictConfig:
    """The run's resolved config: the saved file, or composed from the run config's values.

    `num_banks` (the number of SuperNodes) sets `federation.num_banks` for the partitioners that
    take a number, so that every node of a `flwr run .` simulation is one bank.
    """
    if not uses_values(run_config):
        return OmegaConf.load(str(run_config[protocol.RUN_CONFIG_PATH]))  # type: ignore[return-value]
    overrides = run_overrides(run_config)
    cfg = compose_config(overrides, job_name="fingpt-flwr-run")
    if num_banks is not None and cfg.federation.partitioner != "natural":
        cfg.federation.num_banks = num_banks
    return cfg


def prepared_spec(cfg: DictConfig, num_banks: int) -> FederationSpec:
    """The federation spec of a `flwr run .` run: its banks prepared once per config, then reused.

    Raises ValueError when the data deal out into another number of banks than there are SuperNodes.
    """
    folder = cache_dir() / "federations" / _config_key(cfg)
    if not (folder / SPEC_FILE).is_file():
        _publish(cfg, folder)
    spec = FederationSpec.load(folder / SPEC_FILE)
    if len(spec.banks) != num_banks:
        raise ValueError(
            f"the data deal out into {len(spec.banks)} banks (federation={cfg.federation.partitioner}) but the "
            f"federation has {num_banks} SuperNodes: set the connection's `options.num-supernodes = "
            f"{len(spec.banks)}` in $FLWR_HOME/config.toml, or choose a partitioner that takes a number"
        )
    return spec


def _config_key(cfg: DictConfig) -> str:
    """What decides the prepared banks: the data, the split and the seed."""
    parts = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("data", "federation")}
    parts["seed"] = cfg.get("seed", 0)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _publish(cfg: DictConfig, folder: Path) -> None:
    """Prepare the banks in a private folder and move it into place; another process may win the race."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        layout = prepare_federation(cfg, scratch)
        _spec_of(layout, folder, scratch).save(scratch / SPEC_FILE)
        os.rename(scratch, folder)
    except OSError:
        if not (folder / SPEC_FILE).is_file():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _spec_of(layout: FederationLayout, final: Path, scratch: Path) -> FederationSpec:
    """The spec with the paths the banks will have once `scratch` is renamed to `final`."""

    def moved(path: Path) -> str:
        return str(final / path.resolve().relative_to(scratch.resolve()))

    banks = [
        BankSite(path=moved(path), name=name) for path, name in zip(layout.bank_dirs, layout.bank_names, strict=True)
    ]
    return FederationSpec(list(layout.class_names), int(layout.num_features), moved(layout.test_dir), banks)
