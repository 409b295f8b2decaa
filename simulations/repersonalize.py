"""Compare personalization settings on a finished `fingpt-sim` run without training the federation again.

    python -m fingpt_federated.simulations.repersonalize RUN_DIR personalize.steps=80 personalize.part=head+lora

A run with `personalize.steps > 0` keeps everything the per-bank comparison needs: its resolved config,
the banks' folders (each with its own test split), the final global state and, with `baseline=true`,
the pooled and alone baselines. This re-runs only that comparison (simulations/personalization.py)
with `personalize.*` or `model.train.*` changed, prints the per-bank table and the verdicts, and writes
them to `--out` if given (never over an existing file). With the run's own settings it reproduces the
run's table: on TFNS that is 10 minutes instead of 48.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.server.run_folder import FEDERATION_SPEC, FINAL_STATE, RESOLVED_CONFIG
from fingpt_federated.simulations.baselines import BaselineResult
from fingpt_federated.simulations.personalization import (
    compare_banks,
    markdown_section,
    personalize_settings,
    summary,
)
from fingpt_federated.simulations.sim import BASELINES_FILE
from fingpt_federated.strict_json import jsonable

CHANGEABLE = ("personalize.", "model.train.")


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item or not item.startswith(CHANGEABLE):
            raise ValueError(f"{item!r}: only personalize.* and model.train.* can change on a finished run (KEY=VALUE)")


def run_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's resolved config with `overrides` (personalize.* and model.train.* only) applied."""
    check_overrides(overrides)
    cfg = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{run_dir / RESOLVED_CONFIG} does not hold a config mapping")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    assert isinstance(cfg, DictConfig)
    if personalize_settings(cfg).steps < 1:
        raise ValueError("personalize.steps must be >= 1 (the run's banks need their own test splits, too)")
    return cfg


def load_run(run_dir: Path) -> tuple[FederationSpec, list[BaselineResult]]:
    """The run's federation spec and baselines (none when it ran without `baseline=true`)."""
    for name in (RESOLVED_CONFIG, FEDERATION_SPEC, FINAL_STATE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished fingpt-sim run: {name} is missing")
    baselines_file = run_dir / BASELINES_FILE
    rows = json.loads(baselines_file.read_text(encoding="utf-8")) if baselines_file.is_file() else []
    return FederationSpec.load(run_dir / FEDERATION_SPEC), [BaselineResult(**row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished fingpt-sim run with personalize.steps > 0")
    parser.add_argument("overrides", nargs="*", help="personalize.* or model.train.* settings, KEY=VALUE")
    parser.add_argument("--out", type=Path, help="write the comparison here as JSON (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.out is not None and args.out.exists():
            raise FileExistsError(f"{args.out} exists; refusing to overwrite it")
        check_overrides(args.overrides)
        spec, baselines = load_run(args.run_dir)
        cfg = run_config(args.run_dir, args.overrides)
        rows = compare_banks(cfg, spec, args.run_dir / FINAL_STATE, baselines)
    except (ValueError, OSError, TypeError, KeyError) as error:  # also a damaged baselines.json or spec
        print(f"repersonalize: error: {error}", file=sys.stderr)
        return 2
    settings = personalize_settings(cfg)
    print("\n\n".join(markdown_section(rows, settings)))
    if args.out is not None:
        args.out.write_text(json.dumps(jsonable(summary(rows, settings)), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
