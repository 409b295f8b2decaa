"""The model card of a published model: what it is, how it was trained, and a hash of every file.

`model_card.json` is for machines (fingpt-infer serves it at /model), `model_card.md` for people;
both say the same. Neither hashes itself: `files` lists every other file of the folder with its
sha256 and size, and `model_hash` is one sha256 over that list, the identity of the model that
the audit log records with every prediction. The list is the folder's whole inventory: loading
(infer/loading.py) refuses a folder with a file the card does not list, a listed file missing, an
empty list, or a model hash that does not match the list, so the hash covers everything loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fingpt_federated.model.published import file_sha256, folder_files
from fingpt_federated.server.history import CENTRAL, FEDERATION, History, jsonable
from fingpt_federated.simulations.attacks.card_section import audit_lines, audit_of_run

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CARD_FILES = (CARD_JSON, CARD_MD)


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


def final_metrics(history: History) -> dict[str, Any]:
    """The last round's central test metrics and the banks' aggregated validation metrics, where present."""
    result: dict[str, Any] = {}
    for key, phase, bank in (
        ("test", CENTRAL, CENTRAL),
        ("banks_validation", "evaluate", FEDERATION),
        ("banks_training", "train", FEDERATION),
    ):
        rows = history.select(phase, bank)
        if rows:
            last = max(rows, key=lambda r: r.round)
            result[key] = {"round": last.round, **last.metrics}
    return result


def round_metrics(history: History, server_round: int) -> dict[str, Any]:
    """The metrics of one round: the operator's test set (pooled) and the banks' aggregated validation."""
    result: dict[str, Any] = {}
    for key, phase, bank in (("test", CENTRAL, CENTRAL), ("banks_validation", "evaluate", FEDERATION)):
        rows = [row for row in history.select(phase, bank) if row.round == server_round]
        if rows:
            result[key] = {"round": server_round, **rows[-1].metrics}
    return result


def privacy_spent(history: History) -> dict[str, dict[str, float]]:
    """Per bank, (epsilon, delta) after its last trained round, from the banks' DP metrics."""
    spent: dict[str, dict[str, float]] = {}
    for row in sorted(history.select("train"), key=lambda r: r.round):
        if row.bank != FEDERATION and "epsilon" in row.metrics:
            spent[row.bank] = {
                "epsilon": row.metrics["epsilon"],
                "delta": row.metrics.get("delta", math.nan),
                "round": row.round,
            }
    return spent


def participating_banks(history: History) -> list[str]:
    return sorted({row.bank for row in history.select("train") if row.bank not in (FEDERATION, CENTRAL)})


def write_card(folder: Path, card: Mapping[str, Any]) -> dict[str, Any]:
    """Add the file hashes and model hash to `card`, write both card files, return the JSON card."""
    files = file_hashes(folder)
    audit = audit_of_run(card.get("run"))  # fingpt-audit of this run, when there is one
    full = jsonable({**card, **({"audit": audit} if audit else {}), "model_hash": model_hash(files), "files": files})
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
