"""`privacy=he` in a simulation: one key ceremony for the simulated banks, kept in the run folder.

`he/` in the run folder holds what a real consortium spreads over machines: the secret context
(which only the simulated banks' FederationSpec entries point to), the public context (which the
operator's config points to) and one update-binding key per bank (`he/bindings/NAME.binding`,
the operator's registered copies and the banks' own are the same files here). After the run the
simulation plays the key-holding bank of the publishing hand-over: it decrypts the final
aggregate into `global_state.safetensors` (bf16-rounded) and evaluates it on the global test set,
since the operator, holding no key, evaluated nothing.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig
from safetensors.numpy import load_file

from fingpt_federated.client.handover import decrypt_final_state, run_dir_files
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.privacy.he_context import (
    PUBLIC_NAME,
    SECRET_NAME,
    HEParams,
    key_ceremony,
)
from fingpt_federated.privacy.update_binding import write_mac_key
from fingpt_federated.server.app import FINAL_STATE, CentralEvaluation
from fingpt_federated.server.checkpoint import numpy_to_arrays
from fingpt_federated.server.encrypted_run import BINDING_SUFFIX
from fingpt_federated.server.history import CENTRAL, History

HE_DIR = "he"
BINDINGS = "bindings"


def operator_paths(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """`cfg` with the operator's public context and binding-key folder inside the run folder."""
    cfg = copy.deepcopy(cfg)
    cfg.privacy.he.public_context = str((run_dir / HE_DIR / PUBLIC_NAME).resolve())
    cfg.privacy.he.binding_keys = str((run_dir / HE_DIR / BINDINGS).resolve())
    return cfg


def bank_secrets(cfg: DictConfig, run_dir: Path, spec: FederationSpec) -> FederationSpec:
    """Run the ceremony and create every bank's binding key; the spec with each bank's paths."""
    folder = run_dir / HE_DIR
    params = HEParams.from_config(config_dict(cfg.privacy.he))
    files = key_ceremony(params, folder)
    banks = []
    for bank in spec.banks:
        key = write_mac_key(folder / BINDINGS / f"{bank.name}{BINDING_SUFFIX}")
        banks.append(replace(bank, he_context=str(files.secret.resolve()), binding_key=str(key.resolve())))
    return replace(spec, banks=banks)


def publish_and_test(cfg: DictConfig, spec: FederationSpec, run_dir: Path, history: History) -> Path:
    """Decrypt the final global as a bank would and record its test metrics in the last round's row."""
    global_file, initial_file = run_dir_files(run_dir)
    out = decrypt_final_state(global_file, initial_file, run_dir / HE_DIR / SECRET_NAME, run_dir / FINAL_STATE)
    model, tokenizer = build_model(config_dict(cfg.model), spec.num_classes, spec.num_features)
    central = CentralEvaluation.for_spec(spec, model, tokenizer, cfg)
    if central is not None:
        metrics = central(numpy_to_arrays(load_file(str(out))))
        last = max(row.round for row in history.rows)
        rows = [r for r in history.rows if (r.round, r.phase, r.bank) == (last, CENTRAL, CENTRAL)]
        if rows:
            rows[0].metrics.update(metrics)
        else:
            history.add(last, CENTRAL, CENTRAL, metrics)
    return out
