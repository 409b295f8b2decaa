"""Opening a published model for inference, after checking its files against the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from fingpt_federated.model.published import (
    PublishedModel,
    file_sha256,
    load_published,
    variant_files,
)
from fingpt_federated.server.model_card import CARD_JSON


class ModelFilesError(ValueError):
    """A published file is missing or differs from the hash its model card lists."""


def read_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a published model: {CARD_JSON} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def verify_files(folder: Path, card: dict[str, Any], variant: str) -> None:
    """Every file the variant reads exists and has the sha256 its card lists."""
    prefixes = variant_files(variant)
    listed = {path: entry for path, entry in card["files"].items() if any(path.startswith(p) for p in prefixes)}
    for path, entry in listed.items():
        if not (folder / path).is_file():
            raise ModelFilesError(f"{folder / path}: listed in the model card but missing")
        if file_sha256(folder / path) != entry["sha256"]:
            raise ModelFilesError(f"{folder / path}: sha256 differs from the model card (modified or damaged)")


def open_model(
    folder: str | Path, variant: str = "fp32", *, verify: bool = True, device: torch.device | None = None
) -> tuple[PublishedModel, dict[str, Any]]:
    """The loaded variant and its model card."""
    folder = Path(folder)
    card = read_card(folder)
    if variant not in card["variants"]:
        raise ValueError(f"{folder} has no variant {variant!r}; it has {sorted(card['variants'])}")
    if verify:
        verify_files(folder, card, variant)
    quiet_loading()
    return load_published(folder, variant, device), card


def quiet_loading() -> None:
    """No weight-loading progress bars, and bitsandbytes' notices about optional CPU kernels at most once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
