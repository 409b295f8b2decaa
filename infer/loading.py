"""Opening a published model for inference, after checking the whole folder against its model card.

The card is the folder's inventory: every file but the card itself is listed with its size and
sha256, and the model hash is one sha256 over that list. A folder is refused when its card lists
no files, a file is missing, an unlisted file is present (a tokenizer or backbone file the card
does not know would change behaviour under the original hash), an entry is a link or not a
regular file, a size differs, the model hash does not match the list, or a file that the variant
reads differs from its sha256. Files of other variants are checked by size only (hashing every
variant of a large model would cost more than loading one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fingpt_federated.model.card import CARD_FILES, CARD_JSON, model_hash
from fingpt_federated.model.published import (
    PublishedModel,
    file_sha256,
    load_published,
    variant_files,
)


class ModelFilesError(ValueError):
    """A published folder does not match its model card (missing, unlisted, modified or linked files)."""


def read_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a published model: {CARD_JSON} is missing")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFilesError(f"{path}: not a readable model card ({error})") from None
    if not isinstance(card, dict):
        raise ModelFilesError(f"{path}: a model card is a JSON object")
    return card


def present_files(folder: Path) -> set[str]:
    """Relative POSIX paths of the folder's files but the card's; a link or special file is refused."""
    found: set[str] = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise ModelFilesError(f"{path}: a link inside a published model (only regular files are loaded)")
        if path.is_file():
            found.add(relative)
        elif not path.is_dir():
            raise ModelFilesError(f"{path}: not a regular file")
    return found - set(CARD_FILES)


def listed_files(folder: Path, card: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The card's file list, checked for shape: path -> {sha256, bytes}, and at least one file."""
    files = card.get("files")
    where = folder / CARD_JSON
    if not isinstance(files, dict) or not files:
        raise ModelFilesError(f"{where}: lists no files, so nothing could be verified")
    for path, entry in files.items():
        if not (
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)
        ):
            raise ModelFilesError(f"{where}: the entry of {path!r} needs a sha256 and a size in bytes")
    return files


def verify_files(folder: Path, card: Mapping[str, Any], variant: str) -> None:
    """The folder holds exactly the card's files, at their sizes, under its model hash; the variant's are hashed."""
    files = listed_files(folder, card)
    present = present_files(folder)
    unlisted, missing = sorted(present - set(files)), sorted(set(files) - present)
    if unlisted:
        count = f"{len(unlisted)} unlisted file(s)"
        raise ModelFilesError(f"{folder / unlisted[0]}: not listed in the model card ({count}); refusing to load it")
    if missing:
        raise ModelFilesError(f"{folder / missing[0]}: listed in the model card but missing")
    if card.get("model_hash") != model_hash(files):
        raise ModelFilesError(f"{folder / CARD_JSON}: model_hash does not match the card's file list")
    for path, entry in sorted(files.items()):
        if (folder / path).stat().st_size != entry["bytes"]:
            raise ModelFilesError(f"{folder / path}: size differs from the model card (modified or damaged)")
    prefixes = variant_files(variant)
    for path in sorted(p for p in files if any(p.startswith(prefix) for prefix in prefixes)):
        if file_sha256(folder / path) != files[path]["sha256"]:
            raise ModelFilesError(f"{folder / path}: sha256 differs from the model card (modified or damaged)")


def open_model(
    folder: str | Path, variant: str = "fp32", *, device: torch.device | None = None
) -> tuple[PublishedModel, dict[str, Any]]:
    """The loaded variant and its model card, once the folder matches the card (see the module docstring)."""
    folder = Path(folder)
    card = read_card(folder)
    variants = card.get("variants") or {}
    if variant not in variants:
        raise ValueError(f"{folder} has no variant {variant!r}; it has {sorted(variants)}")
    verify_files(folder, card, variant)
    quiet_loading()
    return load_published(folder, variant, device), card


def quiet_loading() -> None:
    """No weight-loading progress bars, and bitsandbytes' notices about optional CPU kernels at most once."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
