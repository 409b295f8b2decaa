"""A finished run's global model on the test set with the federation's label prior added to its logits.

    python -m fingpt_federated.simulations.prior_shift RUN_DIR --tau 0,0.5,1,1.5
    python -m fingpt_federated.simulations.prior_shift RUN_DIR --state RUN_DIR/checkpoints/round_0004/state.safetensors

Banks that train with the logit-adjusted loss (`model.train.logit_adjustment` tau) learn logits meant for
equal classes; Menon et al. (2021) add tau x log prior back to predict for the natural label mix. This
measures what that would give a run's global state (the final one, or any checkpoint's): the test metrics
for each tau, with the prior of the banks' training labels (add-one smoothed, as the loss's). An analysis
of a simulated run, which can read every bank's rows; the federation itself does not do this. Writes the
rows as JSON to `--out` if given (never over an existing file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import logits_of, metrics_of
from fingpt_federated.model.features import fit_features_on
from fingpt_federated.model.state import load_federated_state
from fingpt_federated.server.run_folder import FEDERATION_SPEC, FINAL_STATE, RESOLVED_CONFIG
from fingpt_federated.strict_json import jsonable


def federation_prior(spec: FederationSpec) -> np.ndarray:
    """The add-one smoothed label prior of all the banks' training rows."""
    counts = np.zeros(spec.num_classes)
    for bank in spec.banks:
        counts += load_bank(bank.path).train.label_counts()
    return (counts + 1.0) / (counts + 1.0).sum()


def shifted_metrics(run_dir: Path, state_file: Path, taus: list[float]) -> dict[str, Any]:
    """The test metrics of `state_file` for each tau, with the prior they were shifted by."""
    for path in (run_dir / RESOLVED_CONFIG, run_dir / FEDERATION_SPEC, state_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {run_dir} is not a finished fingpt-sim run, or no such state")
    spec = FederationSpec.load(run_dir / FEDERATION_SPEC)
    if spec.test_dir is None:
        raise ValueError(f"{run_dir / FEDERATION_SPEC} names no test set")
    cfg = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    model, tokenizer = build_model(config_dict(cfg.model), spec.num_classes, spec.num_features)
    test = load_bank(spec.test_dir).train
    fit_features_on(model, test)
    try:
        state = load_file(str(state_file))
    except SafetensorError as error:
        raise ValueError(f"{state_file} is not a readable safetensors state: {error}") from None
    load_federated_state(model, state)
    logits = logits_of(model, tokenizer, test, int(cfg.model.train.eval_batch_size))
    prior = federation_prior(spec)
    log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float32))
    labels = np.asarray(test.labels)
    rows = [{"tau": tau, **metrics_of(logits + tau * log_prior, labels)} for tau in taus]
    return {"state": str(state_file), "prior": prior.tolist(), "rows": rows}


def _taus(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tau takes numbers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished fingpt-sim run")
    parser.add_argument("--state", type=Path, help=f"a state file (default: RUN_DIR/{FINAL_STATE})")
    parser.add_argument("--tau", type=_taus, default=[0.0, 0.5, 1.0], help="comma-separated (default 0,0.5,1)")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON (must not exist)")
    args = parser.parse_args(argv)
    try:
        if args.out is not None and args.out.exists():
            raise FileExistsError(f"{args.out} exists; refusing to overwrite it")
        found = shifted_metrics(args.run_dir, args.state or args.run_dir / FINAL_STATE, args.tau)
    except (ValueError, OSError, KeyError) as error:
        print(f"prior_shift: error: {error}", file=sys.stderr)
        return 2
    print("prior " + " ".join(f"{p:.3f}" for p in found["prior"]))
    for row in found["rows"]:
        print(" ".join(f"{key} {value:.4f}" for key, value in row.items()))
    if args.out is not None:
        args.out.write_text(json.dumps(jsonable(found), indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
