"""A deployed bank's personalised model: the published global model with its head fine-tuned on the bank's rows.

What `fingpt-client personalize` does after a federation, as client/personalization.py does in
simulation (FedRep's split): the bank opens the operator's published model only once its folder
matches its model card (infer/loading.py: every file listed, sizes, sha256 of what is loaded, the
model hash; optionally the model hash the operator announced over a second channel), fits its own
statistics (series normaliser, static features) on its train rows, fine-tunes the classification
head on them with the rest frozen, and keeps the result only if it is no worse on its validation
split. The LoRA adapters of a published model are merged into its backbone, so the head is the
only local part here.

A kept model is written in the published format that `fingpt-infer` serves (model/published.py,
with a model card whose hashes cover every file) to a folder that must not exist yet: staged in a
hidden sibling and renamed into place, so a failure leaves nothing behind and nothing is ever
overwritten. The head saw the bank's customers without differential privacy, so the folder is
owner-only unless the bank publishes it (`readable`), and its card says so.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fingpt_federated.client.personalization import HEAD, Personalization, personalize
from fingpt_federated.client.training import fit_to_bank
from fingpt_federated.data.bank_data import BankData, load_bank
from fingpt_federated.infer.loading import open_model
from fingpt_federated.model.card import variant_sizes, write_card
from fingpt_federated.model.evaluation import check_compatible
from fingpt_federated.model.published import PublishedModel, write_published
from fingpt_federated.model.train_config import TrainConfig

GLOBAL_CARD_KEYS = (
    "base_model",
    "rounds",
    "planned_rounds",
    "strategy",
    "banks",
    "privacy",
    "metrics",
    "run",
    "selection",
    "selected_metrics",
    "audit",
)
TRAIN_KEYS = ("optimizer", "lr", "batch_size", "weight_decay", "monitor", "seed")
MANIFEST_KEYS = ("class_names", "feature_names", "data")


@dataclass(frozen=True)
class PersonalModel:
    """The outcome: where the model went (None when the global model stayed the better one) and its card."""

    bank: str
    global_hash: str
    personalization: Personalization
    out: Path | None
    card: dict[str, Any] | None


def personalise_published(
    global_dir: Path,
    data: Path,
    out: Path,
    train: TrainConfig,
    *,
    steps: int,
    label_prior: bool = False,
    variants: list[str] | None = None,
    expected_hash: str | None = None,
    readable: bool = False,
) -> PersonalModel:
    """Fine-tune the head of the published model `global_dir` on the bank `data`; write it to `out` if kept.

    Raises FileExistsError when `out` exists (before any work), and ValueError or OSError for a global model
    that does not check out (infer/loading.py's errors), a model hash other than `expected_hash`, or bank data
    that does not fit the model.
    """
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite it (choose another --out, or move it away)")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    published, card = open_model(global_dir, "fp32")
    if expected_hash is not None and card.get("model_hash") != expected_hash:
        raise ValueError(
            f"{global_dir}: model hash {card.get('model_hash')} is not the announced {expected_hash}; refusing it"
        )
    bank = load_bank(data)
    check_fits(published, bank)
    model, tokenizer = published.model, published.tokenizer
    fit_to_bank(model, bank.train)
    result = personalize(
        model, tokenizer, bank.train, bank.valid, train, part=HEAD, steps=steps, label_prior=label_prior
    )
    if not result.kept:
        return PersonalModel(bank.name, str(card["model_hash"]), result, None, None)
    model.eval()
    info = {key: published.manifest[key] for key in MANIFEST_KEYS} | {"personalised_from": card["model_hash"]}
    content = card_content(card, global_dir, bank, result, train, readable)
    written = write_model(out, published, list(variants or card["variants"]), info, content, readable)
    return PersonalModel(bank.name, str(card["model_hash"]), result, out, written)


def check_fits(published: PublishedModel, bank: BankData) -> None:
    """The bank's data has the model's classes (same names, same order) and series features."""
    if list(bank.train.class_names) != published.class_names:
        raise ValueError(
            f"bank {bank.name} has classes {bank.train.class_names}, the global model {published.class_names}"
        )
    check_compatible(published.model, bank.train)


def write_model(
    out: Path,
    published: PublishedModel,
    variants: list[str],
    info: dict[str, Any],
    content: dict[str, Any],
    readable: bool,
) -> dict[str, Any]:
    """Stage the published folder and its card in a hidden sibling of `out`, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # owner-only
    try:
        written = write_published(published.model, published.tokenizer, staging, variants, info)
        card = write_card(staging, content | {"variants": variant_sizes(staging, written)})
        if readable:
            staging.chmod(0o755)
        if out.exists():  # appeared while the bank was training: still never overwritten
            raise FileExistsError(f"{out} appeared while personalising; refusing to overwrite it")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def card_content(
    global_card: dict[str, Any],
    global_dir: Path,
    bank: BankData,
    result: Personalization,
    train: TrainConfig,
    readable: bool,
) -> dict[str, Any]:
    """The global model's card, renamed for the bank, with what the bank changed and how it checked it."""
    model_hash = str(global_card["model_hash"])
    return {
        **{key: global_card[key] for key in GLOBAL_CARD_KEYS if key in global_card},
        "name": f"{global_card.get('name', 'fingpt-federated model')}, personalised for bank {bank.name}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "class_names": list(global_card.get("class_names", bank.train.class_names)),
        "feature_names": list(global_card.get("feature_names", [])),
        "normalizer": normalizer_line(bank) if global_card.get("feature_names") else "none (a text-only model)",
        "state_source": f"the global model {model_hash[:12]} ({global_dir}), its head fine-tuned by bank {bank.name}",
        "personalization": {
            "bank": bank.name,
            "global_model_hash": model_hash,
            "part": HEAD,
            "label_prior": result.label_prior,
            "choice": result.choice,
            "steps": result.steps,
            "seconds": result.seconds,
            "train_rows": len(bank.train),
            "valid_rows": 0 if bank.valid is None else len(bank.valid),
            "train": {key: value for key, value in asdict(train).items() if key in TRAIN_KEYS},
            "valid_global": result.valid_global,
            "valid_personalised": result.valid_personalised,
            "valid_label_prior": result.valid_prior,
            "readable_by_others": readable,
            "privacy": "the head and the statistics were fitted on this bank's own records without differential "
            "privacy: the model is for the bank's own use; sharing it shares what they learned of its customers",
        },
    }


def normalizer_line(bank: BankData) -> str:
    return f"fitted on bank {bank.name}'s train rows ({len(bank.train)} records)"
