"""Publishing a run's global model: load the final state, merge LoRA, write the variants and a model card.

The ServerApp publishes at the end of every plaintext run (`publish:` in conf/config.yaml). It
publishes the round `publish.select` chooses (server/best_round.py): by default the best round by the
monitored validation metric, loaded from its checkpoint (verified; the checkpointer never prunes it),
and the model card records which round, by which metric, its value and the last round's.

Under homomorphic encryption the operator holds only ciphertexts: a key-holding bank decrypts the
final state (`fingpt-client he-decrypt`, the LAST round's aggregate) and publishes that plaintext file
with `fingpt-infer publish RUN_DIR --state FILE`, which reads the same run folder. A handed-over state
is the last round's, so when `publish.select=best` chooses an earlier round, publishing it is refused
with the rounds and values, and `--select last` (or `publish.select=last` in the run's config)
publishes the last round knowingly.

The series normaliser is a per-bank buffer that never travels. The published model gets it fitted
on the operator's test inputs when the run has a test set (labels unused, as the ServerApp's own
evaluation does); otherwise it is the identity after sign·log1p, and the card says which.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
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
from fingpt_federated.federation import protocol
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.backbone import resolve_backbone
from fingpt_federated.model.build import build_model
from fingpt_federated.model.card import variant_sizes, write_card
from fingpt_federated.model.features import fit_features_on
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.merge import merge_lora
from fingpt_federated.model.published import (
    folder_sha256,
    write_published,
)
from fingpt_federated.model.quantize import (
    VARIANTS,
)
from fingpt_federated.model.state import check_finite, load_federated_state
from fingpt_federated.server.best_round import RoundChoice, RoundSelection
from fingpt_federated.server.checkpoint import Checkpointer, CheckpointError
from fingpt_federated.server.encrypted_run import he_enabled
from fingpt_federated.server.history import History
from fingpt_federated.server.model_card import (
    final_metrics,
    participating_banks,
    privacy_spent,
    round_metrics,
)
from fingpt_federated.server.run_audit import audit_of_run
from fingpt_federated.server.run_folder import (
    CHECKPOINTS,
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
        """The settings; the round selection (`select`, `monitor`, `mode`) is RoundSelection.from_config's."""
        block = cfg.get("publish")
        values = {} if block is None else config_dict(block)
        unknown = sorted(set(values) - {"enabled", "variants", "out", *SELECTION_KEYS})
        if unknown:
            raise ValueError(
                f"unknown publish setting(s) {unknown}; known: enabled, variants, out, select, monitor, mode"
            )
        if "variants" in values:
            values["variants"] = tuple(values["variants"])
        return cls(**{key: value for key, value in values.items() if key not in SELECTION_KEYS})


SELECTION_KEYS = ("select", "monitor", "mode")


def selection(cfg: DictConfig, select: str | None = None) -> RoundSelection:
    """The config's round selection, `select` (best | last) replacing `publish.select` when given."""
    chosen = RoundSelection.from_config(cfg)
    return chosen if select is None else replace(chosen, select=select)


def chosen_state(choice: RoundChoice, run_dir: Path, final_state: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The plaintext state of the chosen round and where it came from: the final state when it is the last
    round, else that round's checkpoint (verified as a resume would verify it)."""
    if choice.round == choice.last_round:
        return load_state_file(final_state), f"the ServerApp's final global state ({final_state.name})"
    try:
        checkpoint = Checkpointer(run_dir / CHECKPOINTS, None).load(choice.round)
    except CheckpointError as error:  # the best round is never pruned: this is damage, said in one line
        reason = str(error).split(". ")[0]
        way_out = "`--select last` publishes the last round"
        raise ValueError(f"cannot publish {choice.line()}: {reason}; {way_out}") from None
    source = f"the checkpoint of round {choice.round} ({checkpoint_name(choice.round)}), chosen by {choice.line()}"
    return protocol.record_to_state(checkpoint.arrays), source


def checkpoint_name(server_round: int) -> str:
    return f"{CHECKPOINTS}/{Checkpointer(CHECKPOINTS, None).path(server_round).name}"


def check_handed_over(choice: RoundChoice, state: Path) -> None:
    """A handed-over state (a bank's decryption of global_state.he) is the last round's: refuse it when the
    selection chose another round, saying how to publish it anyway."""
    if choice.round != choice.last_round:
        raise ValueError(
            f"publish.select={choice.select} chooses {choice.line()}, but {state} is a handed-over state, i.e. the "
            f"last round's ({choice.last_round}; under HE the operator keeps only ciphertexts and a bank decrypts "
            "the last aggregate): publish the last round with `--select last` (or publish.select=last)"
        )


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
    choice = selection(cfg).choose(history)
    if he_enabled(cfg):
        line = (
            "Not publishing: under HE the server holds only ciphertexts. A key-holding bank publishes with "
            f"`fingpt-client he-decrypt` then `fingpt-infer publish {run_dir} --state DECRYPTED.safetensors`"
        )
        if choice.round != choice.last_round:
            line += (
                f". publish.select={choice.select} chooses {choice.line()}, which a decrypted last aggregate is not: "
                "add `--select last` to publish the last round"
            )
        return line
    out = Path(settings.out) if settings.out else run_dir / MODEL_DIR
    state, source = chosen_state(choice, run_dir, state_path)
    card = publish(
        state, cfg, spec, history, out, settings.variants, run=str(run_dir), state_source=source, choice=choice
    )
    return (
        f"Published the global model of {choice.line()} to {out} (variants {', '.join(card['variants'])}, "
        f"hash {card['model_hash'][:12]})"
    )


def publish_run(
    run_dir: Path,
    *,
    state: Path | None = None,
    out: Path | None = None,
    variants: Sequence[str] | None = None,
    select: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Publish from a run folder (its resolved config, spec and metrics) the round `select` (default: the
    config's publish.select) chooses; `state` (a handed-over last round) replaces its final state."""
    cfg = OmegaConf.load(run_dir / RESOLVED_CONFIG)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{run_dir / RESOLVED_CONFIG} does not hold a config mapping")
    spec = FederationSpec.load(run_dir / FEDERATION_SPEC)
    metrics = run_dir / METRICS_JSON
    history = History.from_json(metrics.read_text(encoding="utf-8")) if metrics.is_file() else History()
    settings = PublishSettings.from_config(cfg)
    out = out or (Path(settings.out) if settings.out else run_dir / MODEL_DIR)
    choice = selection(cfg, select).choose(history)
    if state is not None:
        check_handed_over(choice, state)
        tensors, source = load_state_file(state), f"a state handed over for publishing ({state.name})"
    else:
        tensors, source = chosen_state(choice, run_dir, run_dir / FINAL_STATE)
    names = tuple(variants or settings.variants)
    card = publish(tensors, cfg, spec, history, out, names, run=str(run_dir), state_source=source, choice=choice)
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
    choice: RoundChoice | None = None,
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
            card_content(cfg, spec, names, history, run, state_source, normalizer, variant_sizes(staging, written))
            | selection_content(history, choice),
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


def selection_content(history: History, choice: RoundChoice | None) -> dict[str, Any]:
    """The card's `selection` (which round, by which metric, its value, the last round's) and that round's metrics."""
    if choice is None:
        return {}
    return {"selection": choice.to_dict(), "selected_metrics": round_metrics(history, choice.round)}


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
    } | ({"audit": audit} if (audit := audit_of_run(run)) else {})  # fingpt-audit of this run, when there is one
