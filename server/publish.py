"""Publishing a run's global model: load the final state, merge LoRA, write the variants and a model card.

The ServerApp publishes at the end of every plaintext run (`publish:` in conf/config.yaml). Under
homomorphic encryption the operator holds only ciphertexts: a key-holding bank decrypts the final
state (`fingpt-client he-decrypt`) and publishes that plaintext file with
`fingpt-infer publish RUN_DIR --state FILE`, which reads the same run folder.

The series normaliser is a per-bank buffer that never travels. The published model gets it fitted
on the operator's test inputs when the run has a test set (labels unused, as the ServerApp's own
evaluation does); otherwise it is the identity after sign·log1p, and the card says which.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file

from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.records import BankDataset
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.backbone import resolve_backbone
from fingpt_federated.model.build import build_model
from fingpt_federated.model.features import fit_features_on
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.merge import merge_lora
from fingpt_federated.model.published import (
    BACKBONE_DIR,
    HYBRID_WEIGHTS,
    folder_files,
    folder_sha256,
    write_published,
)
from fingpt_federated.model.quantize import (
    RECIPES,
    VARIANTS,
    load_variant,
    serialized_bytes,
    stored_folder,
)
from fingpt_federated.model.state import check_finite, load_federated_state
from fingpt_federated.server.encrypted_run import he_enabled
from fingpt_federated.server.history import History
from fingpt_federated.server.model_card import (
    final_metrics,
    participating_banks,
    privacy_spent,
    write_card,
)
from fingpt_federated.server.run_folder import (
    FEDERATION_SPEC,
    FINAL_STATE,
    METRICS_JSON,
    RESOLVED_CONFIG,
)

MODEL_DIR = "model"


@dataclass(frozen=True)
class PublishSettings:
    """The `publish:` block: whether the ServerApp publishes, which variants, where (null: RUN_DIR/model)."""

    enabled: bool = True
    variants: tuple[str, ...] = VARIANTS
    out: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> PublishSettings:
        block = cfg.get("publish")
        values = {} if block is None else config_dict(block)
        unknown = sorted(set(values) - {"enabled", "variants", "out"})
        if unknown:
            raise ValueError(f"unknown publish setting(s) {unknown}; known: enabled, variants, out")
        if "variants" in values:
            values["variants"] = tuple(values["variants"])
        return cls(**values)


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A plaintext federated state saved as safetensors (the ServerApp's, or a bank's decrypted one).

    A state with a NaN or an infinity is refused (`NonFiniteState`, naming the tensors): publishing it
    would give a model whose every answer is garbage, under a valid card and hash.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no federated state at {path}")
    try:
        state = load_file(str(path))
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None
    check_finite(state, f"{path} (not published)")
    return state


def publish_after_run(cfg: DictConfig, spec: FederationSpec, history: History, run_dir: Path, state_path: Path) -> str:
    """The ServerApp's end-of-run publishing; returns one line saying what happened."""
    settings = PublishSettings.from_config(cfg)
    if not settings.enabled:
        return "Publishing is off (publish.enabled=false)"
    if he_enabled(cfg):
        return (
            "Not publishing: under HE the server holds only ciphertexts. A key-holding bank publishes with "
            f"`fingpt-client he-decrypt` then `fingpt-infer publish {run_dir} --state DECRYPTED.safetensors`"
        )
    out = Path(settings.out) if settings.out else run_dir / MODEL_DIR
    card = publish(
        load_state_file(state_path),
        cfg,
        spec,
        history,
        out,
        settings.variants,
        run=str(run_dir),
        state_source=f"the ServerApp's final global state ({state_path.name})",
    )
    return (
        f"Published the global model to {out} (variants {', '.join(card['variants'])}, hash {card['model_hash'][:12]})"
    )


def publish_run(
    run_dir: Path, *, state: Path | None = None, out: Path | None = None, variants: Sequence[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Publish from a run folder (its resolved config, spec and metrics); `state` replaces its final state."""
    cfg = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{run_dir / RESOLVED_CONFIG} does not hold a config mapping")
    spec = FederationSpec.load(run_dir / FEDERATION_SPEC)
    metrics = run_dir / METRICS_JSON
    history = History.from_json(metrics.read_text(encoding="utf-8")) if metrics.is_file() else History()
    settings = PublishSettings.from_config(cfg)
    out = out or (Path(settings.out) if settings.out else run_dir / MODEL_DIR)
    state_path = state or run_dir / FINAL_STATE
    source = (
        f"a state handed over for publishing ({state_path.name})"
        if state
        else f"the ServerApp's final global state ({state_path.name})"
    )
    card = publish(
        load_state_file(state_path),
        cfg,
        spec,
        history,
        out,
        tuple(variants or settings.variants),
        run=str(run_dir),
        state_source=source,
    )
    return out, card


def publish(
    state: Mapping[str, torch.Tensor],
    cfg: DictConfig,
    spec: FederationSpec,
    history: History,
    out: Path,
    variants: Sequence[str],
    *,
    run: str,
    state_source: str,
) -> dict[str, Any]:
    """Write the published model folder `out` (replaced atomically if it exists); returns its card."""
    model, tokenizer = build_model(config_dict(cfg.model), spec.num_classes, spec.num_features)
    load_federated_state(model, state)
    test = load_bank(spec.test_dir).train if spec.test_dir else None
    normalizer = prepare_normalizer(model, test)
    names = feature_names(spec, test)
    merge_lora(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # a published model is meant to be read (mkdtemp makes it owner-only)
    try:
        written = write_published(model, tokenizer, staging, list(variants), manifest_info(cfg, spec, names))
        card = write_card(
            staging,
            card_content(cfg, spec, names, history, run, state_source, normalizer, variant_sizes(staging, written)),
        )
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def prepare_normalizer(model: HybridFinGPT, test: BankDataset | None) -> str:
    """Fit the series normaliser for the published model; returns what the card says about it."""
    if test is not None:
        fit_features_on(model, test)  # static features: statistics and vocabulary of the test inputs
    if model.series_encoder is None:
        return "none (a text-only model)"
    if test is not None and test.series is not None and test.mask is not None:
        model.fit_normalizer(test.series, test.mask)
        return f"fitted on the operator's test inputs ({len(test)} records, labels unused)"
    model.series_encoder.normalizer.fitted.fill_(True)
    return "identity after sign·log1p (the run has no test set to fit it on)"


def manifest_info(cfg: DictConfig, spec: FederationSpec, names: list[str]) -> dict[str, Any]:
    """What fingpt-infer needs beside the weights: names, and how to read a record of the training data
    (the data config without the operator's files, splits and partition keys)."""
    data = config_dict(cfg.data) if cfg.get("data") is not None else {}
    for training_only in ("files", "synthetic", "split", "keep_columns"):
        data.pop(training_only, None)
    return {"class_names": list(spec.class_names), "feature_names": names, "data": data}


def feature_names(spec: FederationSpec, test: BankDataset | None) -> list[str]:
    """The series feature names, from the test set when there is one (the spec has only their count)."""
    if spec.num_features == 0:
        return []
    if test is not None and len(test.feature_names) == spec.num_features:
        return list(test.feature_names)
    return [f"feature_{i}" for i in range(spec.num_features)]


def variant_sizes(folder: Path, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Bytes of each variant's weights (backbone + hybrid parts); a recipe is measured as built."""
    hybrid = (folder / HYBRID_WEIGHTS).stat().st_size
    sizes: dict[str, dict[str, Any]] = {}
    for variant in variants:
        stored = folder / BACKBONE_DIR / stored_folder(variant)
        if variant in RECIPES:
            size = serialized_bytes(load_variant(stored, variant, torch.device("cpu")))
        else:
            size = sum((stored / rel).stat().st_size for rel in folder_files(stored))
        sizes[variant] = {
            "loads_from": f"{BACKBONE_DIR}/{stored.name}" + (" (at load time)" if variant in RECIPES else ""),
            "bytes": size + hybrid,
        }
    for entry in sizes.values():
        entry["ratio_to_fp32"] = entry["bytes"] / sizes["fp32"]["bytes"]
    return sizes


def card_content(
    cfg: DictConfig,
    spec: FederationSpec,
    names: list[str],
    history: History,
    run: str,
    state_source: str,
    normalizer: str,
    variants: Mapping[str, Any],
) -> dict[str, Any]:
    backbone = str(cfg.model.backbone)
    strategy = cfg.strategy
    return {
        "name": f"fingpt-federated {cfg.get('data', {}).get('name', 'model')} classifier",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": run,
        "base_model": {"name": backbone, "sha256": folder_sha256(resolve_backbone(backbone))},
        "class_names": list(spec.class_names),
        "feature_names": names,
        "rounds": max((row.round for row in history.rows), default=0),
        "planned_rounds": int(cfg.federation.rounds),
        "strategy": {
            "name": str(strategy.name),
            "flower": strategy.get("flower"),
            "mu": strategy.get("mu"),
            "options": OmegaConf.to_container(strategy.get("options") or OmegaConf.create({}), resolve=True),
            "local_epochs": strategy.get("local_epochs"),
            "local_steps": strategy.get("local_steps"),
        },
        "banks": participating_banks(history),
        "privacy": {
            "dp": bool(OmegaConf.select(cfg, "privacy.dp.enabled", default=False)),
            "he": he_enabled(cfg),
            "spent": privacy_spent(history),
        },
        "metrics": final_metrics(history),
        "normalizer": normalizer,
        "state_source": state_source,
        "variants": dict(variants),
    }
