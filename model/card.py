"""The model card of a published model folder: what it is, how it was trained, and a hash of every file.

`model_card.json` is for machines (fingpt-infer serves it at /model), `model_card.md` for people;
both say the same. Neither hashes itself: `files` lists every other file of the folder with its
sha256 and size, and `model_hash` is one sha256 over that list, the identity of the model that
the audit log records with every prediction. The list is the folder's whole inventory: loading
(infer/loading.py) refuses a folder with a file the card does not list, a listed file missing, an
empty list, or a model hash that does not match the list, so the hash covers everything loaded.

The card's content comes from whoever publishes: the operator (server/publish.py, from its run's
history and, when `fingpt-audit` attacked the run, the audit's headline figures under `audit`) or a
bank personalising the global model (client/personal_model.py); this module writes and renders it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fingpt_federated.model.published import BACKBONE_DIR, HYBRID_WEIGHTS, file_sha256, folder_files
from fingpt_federated.model.quantize import RECIPES, load_variant, serialized_bytes, stored_folder
from fingpt_federated.strict_json import jsonable

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_FILES = (CARD_JSON, CARD_MD)
AUDIT_KEPT = {
    "membership": (
        "model",
        "privacy",
        "epsilon_target",
        "epsilon_spent",
        "mia_auc",
        "tpr_at_fpr_0_01",
        "epsilon_lower",
    ),
    "backdoor": ("defence", "banks", "hostile", "success_rate", "untriggered_target_rate", "clean_accuracy"),
}


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """relative path -> {sha256, bytes} of every file of the folder but the card itself."""
    return {
        rel.as_posix(): {"sha256": file_sha256(folder / rel), "bytes": (folder / rel).stat().st_size}
        for rel in folder_files(folder)
        if rel.as_posix() not in CARD_FILES
    }


def model_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    """sha256 over the sorted (path, sha256) list: changes when any published file changes."""
    listing = "".join(f"{path}\0{files[path]['sha256']}\n" for path in sorted(files))
    return hashlib.sha256(listing.encode()).hexdigest()


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


def write_card(folder: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """Add the file hashes and model hash to `card`, write both card files, return the JSON card."""
    files = file_hashes(folder)
    full = jsonable({**card, "model_hash": model_hash(files), "files": files})
    (folder / CARD_JSON).write_text(json.dumps(full, indent=2, sort_keys=True), encoding="utf-8")
    (folder / CARD_MD).write_text(markdown(full), encoding="utf-8")
    return full


def markdown(card: Mapping[str, Any]) -> str:
    base = card["base_model"]
    lines = [
        f"# {card['name']}",
        "",
        f"Published {card['date']} from run `{card['run']}`. Model hash `{card['model_hash']}`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {base['name']} (sha256 `{base['sha256']}`) |",
        f"| task | {', '.join(card['class_names'])} |",
        f"| series features | {', '.join(card['feature_names']) or 'none'} |",
        f"| rounds | {card['rounds']} |",
        f"| strategy | {_strategy(card['strategy'])} |",
        f"| participating banks | {', '.join(card['banks']) or 'none recorded'} |",
        f"| privacy | {_privacy(card['privacy'])} |",
        f"| series normaliser | {card['normalizer']} |",
        f"| state | {card['state_source']} |",
        "",
        *_selection_lines(card),
        *_personalization_lines(card),
        "## Final metrics",
        "",
        *_metric_lines(card["metrics"]),
        "",
        *audit_lines(card.get("audit")),
        "## Variants",
        "",
        "| variant | loads from | bytes | vs fp32 |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| {name} | {v['loads_from']} | {v['bytes']:,} | {v['ratio_to_fp32']:.2f} |"
            for name, v in card["variants"].items()
        ),
        "",
        "## Files",
        "",
        "| file | bytes | sha256 |",
        "| --- | ---: | --- |",
        *(f"| {path} | {f['bytes']:,} | `{f['sha256']}` |" for path, f in card["files"].items()),
    ]
    return "\n".join(lines) + "\n"


def audit_lines(audit: Mapping[str, Any] | None) -> list[str]:
    """Markdown lines of the card's audit section (none without an audit): its figures as `AUDIT_KEPT` keeps them."""
    if not audit:
        return []
    lines = ["## Privacy and robustness audit", "", f"From `{audit['file']}` (fingpt-audit).", ""]
    lines += ["| model attacked | privacy | epsilon target | spent | canary AUC | TPR@FPR 1% | epsilon lower (95%) |"]
    lines += ["| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [
        "| " + " | ".join(_cell(row.get(key)) for key in AUDIT_KEPT["membership"]) + " |" for row in audit["membership"]
    ]
    lines += [
        "",
        "| backdoor defence | banks | hostile banks | attack success | untriggered target rate | clean accuracy |",
    ]
    lines += ["| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [
        "| " + " | ".join(_cell(row.get(key)) for key in AUDIT_KEPT["backdoor"]) + " |" for row in audit["backdoor"]
    ]
    return [*lines, ""]


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "-" if math.isnan(float(value)) else f"{float(value):.3g}"
    return "-" if value is None else str(value)


def _selection_lines(card: Mapping[str, Any]) -> list[str]:
    """Which round was published and why, with that round's metrics (cards written before the selection: none)."""
    selection = card.get("selection")
    if not selection:
        return []
    line = (
        f"Round {selection['round']} of {selection['last_round']} (publish.select={selection['select']}): "
        f"{selection['monitor']} {_value(selection['value'])} ({selection['mode']} is best), "
        f"last round {_value(selection['last_value'])}."
    )
    note = [selection["note"], ""] if selection.get("note") else []
    return ["## Published round", "", line, "", *note, *_metric_lines(card.get("selected_metrics") or {}), ""]


def _personalization_lines(card: Mapping[str, Any]) -> list[str]:
    """A bank's personalised model (client/personal_model.py): from which global model, what changed, the check."""
    found = card.get("personalization")
    if not found:
        return []
    monitor = found["train"]["monitor"]
    scores = [
        f"{name} {_value((found[key] or {}).get(monitor))}"
        for name, key in (("global", "valid_global"), ("personalised", "valid_personalised"))
    ]
    return [
        "## Personalisation",
        "",
        f"Bank {found['bank']} fine-tuned the {found['part']} of the global model `{found['global_model_hash']}` "
        f"for {found['steps']} steps on its {found['train_rows']} train rows and kept it: {monitor} on its "
        f"{found['valid_rows']} validation rows {', '.join(scores)}.",
        "",
        f"Privacy: {found['privacy']}.",
        "",
    ]


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "not measured"


def _strategy(strategy: Mapping[str, Any]) -> str:
    """name=..., flower=..., then the Flower class's options as if they were settings of their own."""
    settings = {**{k: v for k, v in strategy.items() if k != "options"}, **(strategy.get("options") or {})}
    return ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)


def _privacy(privacy: Mapping[str, Any]) -> str:
    parts = [f"DP {'on' if privacy['dp'] else 'off'}", f"HE {'on' if privacy['he'] else 'off'}"]
    parts += [f"{bank}: epsilon {s['epsilon']:.3g}, delta {s['delta']:.3g}" for bank, s in privacy["spent"].items()]
    return "; ".join(parts)


def _metric_lines(metrics: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not metrics:
        return ["No metrics were recorded."]
    return [
        f"- {name} (round {values['round']}): "
        + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in values.items()
            if k != "round" and v is not None
        )
        for name, values in metrics.items()
    ]
