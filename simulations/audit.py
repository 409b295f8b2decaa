"""`fingpt-audit`: train the federations an attack needs (the same ServerApp and ClientApp as `fingpt-sim`,
on Flower's simulation engine) and attack them.

    fingpt-audit preset=quick        # tiny model, synthetic news: minutes on 2 cores
    fingpt-audit preset=tfns         # MiniLM, TFNS, 10 banks Dirichlet 0.3, the DP recipe
    fingpt-audit preset=backdoor_boosted   # a boosted, count-inflating backdoor bank against bounded influence

Runs (sub-folders of the run folder), each a full `fingpt-sim` run:
- `federation_none`, `federation_eps<E>`: the preset's federation without DP and at each target epsilon;
  bank `canary_bank` adds the canaries (`canaries:N`), bank `backdoor_bank` the backdoor (`backdoor:T`);
- `federation_<defence>`: no DP, each of `backdoor_defences` (on top of the update checks every run has),
  and `federation_floor`: no defence, the backdoor bank honest (what the trigger does to a model that
  never saw it);
- with `backdoor_sim` (overrides on top of `sim`, e.g. 10 banks), the backdoor rows without DP come from
  federations of their own instead, with the backdoor bank only: `backdoor_none`, `backdoor_floor`,
  `backdoor_<defence>`;
- `backdoor_with` (e.g. `scale:5+inflate:10`) adds behaviours to the backdoor bank's: a boosted,
  count-inflating model-replacement attack (conf/preset/backdoor_boosted.yaml);
- `operator_plaintext`, `operator_dp`: one bank, one round of plain SGD (its update is the new global).
The canary bank's last update in `federation_none` is not stored by the simulation: it is repeated from the
checkpoints (simulations/attacks/bank_update.py).

Attacks (simulations/attacks/): canary membership (offline LiRA) against the published global model and,
without DP, the canary bank's own update (the operator's view), the
Clopper-Pearson epsilon lower bound, the operator's label-histogram and batch-membership attacks on one
update, and the backdoor's success per round (simulations/attacks/backdoor.py says what counts).
`preset.parts` picks what runs (membership, backdoor, operator_view; default all). Writes
audit.json, audit.md, roc.png, backdoor.png and prints a table. Epsilon spent is what the canary bank's
train replies report from its ledger.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.table import Table
from safetensors.numpy import load_file

from fingpt_federated.client.hostile import train_data
from fingpt_federated.client.training import private_config
from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.errors import DataError
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.server.checkpoint import CheckpointError
from fingpt_federated.server.history import History
from fingpt_federated.server.privacy_record import spent_by_bank
from fingpt_federated.server.run_audit import AUDIT_JSON
from fingpt_federated.server.run_folder import FINAL_STATE, METRICS_JSON
from fingpt_federated.simulations.attacks import backdoor, canaries, epsilon_bound, membership, operator_view
from fingpt_federated.simulations.attacks.bank_update import replayed_update
from fingpt_federated.simulations.attacks.plots import plot_backdoor, plot_roc
from fingpt_federated.simulations.attacks.scoring import Scorer
from fingpt_federated.simulations.sim import simulate
from fingpt_federated.simulations.table_format import figure
from fingpt_federated.strict_json import jsonable

AUDIT_MD = "audit.md"


def sim_config(preset: DictConfig, extra: list[str]) -> DictConfig:
    return compose(config_name="config", overrides=[*preset.sim, *extra])


def privacy_overrides(preset: DictConfig, epsilon: float | None) -> list[str]:
    """No DP, or DP at `epsilon` with the preset's DP recipe (`dp_recipe`: optimizer, lr, clipping, batch)."""
    if epsilon is None:
        return ["privacy=none"]
    recipe = list(preset.get("dp_recipe") or [])
    return ["privacy=dp", f"privacy.dp.target_epsilon={epsilon}", f"privacy.dp.delta={preset.delta}", *recipe]


def train(preset: DictConfig, folder: Path, extra: list[str], hostile: dict[int, str]) -> tuple[DictConfig, History]:
    """One `fingpt-sim` run of the preset with `extra` overrides and these banks' behaviours (client/hostile.py)."""
    cfg = sim_config(preset, extra)
    with open_dict(cfg):
        cfg.simulation.hostile_banks = hostile
    if finished(folder, cfg):  # an audit run again in its folder continues where it stopped
        return cfg, History.from_json((folder / METRICS_JSON).read_text(encoding="utf-8"))
    simulate(cfg, folder, echo=False)
    return cfg, History.from_json((folder / METRICS_JSON).read_text(encoding="utf-8"))


def finished(folder: Path, cfg: DictConfig) -> bool:
    """The sub-run in `folder` ran to its end with this very config (final state written after the metrics)."""
    saved = folder / "resolved_config.yaml"
    if not (folder / FINAL_STATE).is_file() or not saved.is_file():
        return False
    return OmegaConf.to_container(OmegaConf.load(saved), resolve=True) == OmegaConf.to_container(cfg, resolve=True)


def state_of(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))


def round_states(folder: Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    rounds = sorted(folder.glob("checkpoints/round_*/state.safetensors"))
    return [(int(p.parent.name.split("_")[1]), state_of(p)) for p in rounds]


def membership_row(
    scorer: Scorer, state: dict, preset: DictConfig, spent: float | None, epsilon: float | None, model: str
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """The canary attack on `state` (`model`: the published global, or the canary bank's own update)."""
    chosen = canaries.canary_set(int(preset.canaries), len(scorer.class_names))
    population = canaries.population(int(preset.population), chosen.texts)
    scores = membership.lira_scores(scorer, state, scorer.initial, chosen.texts, chosen.labels, population)
    inside, outside = scores[chosen.member], scores[~chosen.member]
    row = {
        "privacy": "none" if epsilon is None else "dp",
        "model": model,
        "epsilon_target": epsilon,
        "epsilon_spent": spent,
        "canaries": int(preset.canaries),
        "mia_auc": membership.auc(inside, outside),
        "tpr_at_fpr_0_01": membership.tpr_at_fpr(inside, outside, 0.01),
        "epsilon_lower": epsilon_bound.epsilon_lower_bound(
            inside, outside, float(preset.delta), float(preset.confidence)
        ),
        "confidence": float(preset.confidence),
    }
    return row, (inside, outside)


def canary_update(scorer: Scorer, preset: DictConfig, folder: Path, cfg: DictConfig) -> dict[str, np.ndarray]:
    """The canary bank's reply in the run's last round, repeated (simulations/attacks/bank_update.py)."""
    states = dict(round_states(folder))
    last = max(states)
    sent = states.get(last - 1, {k: v.numpy() for k, v in scorer.initial.items()})
    banks = folder / "federation" / "banks"
    data = train_data(f"canaries:{int(preset.canaries)}", load_bank(banks / f"bank_{int(preset.canary_bank):02d}"))
    steps = cfg.strategy.get("local_steps")
    return replayed_update(
        config_dict(cfg.model), sent, data, int(cfg.strategy.local_epochs), None if steps is None else int(steps)
    )


def backdoor_rows(
    scorer: Scorer, folder: Path, defence: str, target: int, trigger: str, hostile: int = 1
) -> dict[str, Any]:
    """The backdoor's success per round in the run in `folder`; `banks`: how many banks its federation has,
    `hostile`: how many of them are backdoor banks (0: the floor, a model that never saw the trigger)."""
    banks = len(list((folder / "federation" / "banks").glob("bank_*")))
    test = load_bank(folder / "federation" / "test").train
    texts, labels = list(test.texts or []), test.labels
    per_round = []
    for number, state in round_states(folder):
        clean = scorer.predictions(state, texts)
        rates = backdoor.rates(clean, scorer.predictions(state, backdoor.triggered(texts, trigger)), labels, target)
        per_round.append({"round": number, **rates.as_dict(), "clean_accuracy": float((clean == labels).mean())})
    last = {k: v for k, v in per_round[-1].items() if k != "round"}
    return {"defence": defence, "banks": banks, "hostile": hostile, **last, "rounds": per_round}


def hostile_fate(folder: Path, index: int) -> dict[str, Any]:
    """The backdoor bank's share of the federation's train rows (before its poisoned copies), and in how
    many rounds the server took its train reply as sent, bounded it (strategy.update_checks.clip_norm_ratio,
    max_examples_ratio, registered_examples) or refused it."""
    banks = [load_bank(path) for path in sorted((folder / "federation" / "banks").glob("bank_*"))]
    hostile = load_bank(folder / "federation" / "banks" / f"bank_{index:02d}")
    history = History.from_json((folder / METRICS_JSON).read_text(encoding="utf-8"))
    rows = [row for row in history.rows if row.phase == "train" and row.bank == hostile.name]
    bounded = sum(row.status == "ok" and "clip_scale" in row.metrics for row in rows)
    accepted = sum(row.status == "ok" for row in rows) - bounded
    return {
        "hostile_share": len(hostile.train) / sum(len(bank.train) for bank in banks),
        "hostile_accepted": accepted,
        "hostile_bounded": bounded,
        "hostile_refused": len(rows) - accepted - bounded,
    }


def round_step(cfg: DictConfig) -> TrainConfig:
    """The bank's local-step settings in the run's first round, as the operator who set the run knows them:
    under DP the bank's own rule (`private_config`: `privacy.dp.lr` and the logical batch)."""
    train = TrainConfig.from_mapping(config_dict(cfg.model.train))
    if not cfg.privacy.dp.enabled:
        return train
    return private_config(train, DPSettings.from_mapping(config_dict(cfg.privacy.dp)), server_round=1)


def operator_rows(scorer: Scorer, preset: DictConfig, folder: Path, cfg: DictConfig, view: str) -> list[dict]:
    """The histogram and batch-membership attacks on the one bank's one-round update (the new global)."""
    bank = train_data(f"canaries:{int(preset.canaries)}", load_bank(folder / "federation" / "banks" / "bank_00"))
    truth = bank.train.label_counts()
    after = state_of(folder / FINAL_STATE)
    before = {k: v.numpy() for k, v in scorer.initial.items()}
    bias = next(name for name in after if name.endswith("head.1.bias"))
    step = round_step(cfg)
    test = load_bank(folder / "federation" / "test").train
    # the bias moves by the mean prediction of each step: between the round's two ends, the average of the two
    texts = list(test.texts or [])
    ends = [scorer.logits(state, texts, test.labels).softmax(dim=1).mean(dim=0).numpy() for state in (before, after)]
    mean_p = np.mean(ends, axis=0)
    epochs = int(cfg.strategy.get("local_epochs") or step.epochs)  # the round's task sets the epochs
    steps = math.ceil(len(bank.train) / step.batch_size) * epochs
    estimate = operator_view.histogram_from_bias(
        after[bias] - before[bias], mean_p, len(bank.train), steps, step.batch_size, step.lr
    )
    chosen = canaries.canary_set(int(preset.canaries), len(scorer.class_names))
    drop = scorer.losses(before, chosen.texts, chosen.labels) - scorer.losses(after, chosen.texts, chosen.labels)
    return [
        {
            "view": view,
            "attack": "label_histogram",
            "success": operator_view.histogram_overlap(estimate, truth),
            "estimate": estimate.round(1).tolist(),
            "truth": truth.tolist(),
        },
        {
            "view": view,
            "attack": "batch_membership_auc",
            "success": membership.auc(drop[chosen.member], drop[~chosen.member]),
        },
    ]


def he_rows() -> list[dict]:
    """Under HE the operator holds ciphertexts only: its best guess is the prior, so these are not run."""
    text = "ciphertext only (BFV or CKKS, the banks' key; the operator has the public context): attack has no input"
    return [
        {"view": "he", "attack": "label_histogram", "success": None, "note": text},
        {"view": "he", "attack": "batch_membership_auc", "success": 0.5, "note": text + "; chance"},
    ]


PARTS = ("membership", "backdoor", "operator_view")
"""What `fingpt-audit` runs (`preset.parts`, default all): `+preset.parts=[backdoor]` trains only the backdoor
federations (with `backdoor_sim`; without it the membership federations, which carry the backdoor bank)."""


def defence_overrides(preset: DictConfig) -> dict[str, list[str]]:
    """`backdoor_defences`: each defended row's name and the overrides of its federation (on top of the
    update checks every run has): a mapping of names to overrides, or a list whose entries are strategy
    names (`fedmedian`: `strategy=fedmedian`) or such one-entry mappings (`{dp_eps8: [privacy=dp, ...]}`)."""
    defences = preset.get("backdoor_defences")
    if not defences:
        return {}
    entries = defences if OmegaConf.is_list(defences) else [defences]
    rows: dict[str, list[str]] = {}
    for entry in entries:
        if OmegaConf.is_dict(entry):
            rows |= {str(name): [str(o) for o in overrides] for name, overrides in entry.items()}
        else:
            rows[str(entry)] = [f"strategy={entry}"]
    return rows


def audit(preset: DictConfig, run_dir: Path) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    parts = {str(p) for p in (preset.get("parts") or PARTS)}
    if not parts <= set(PARTS):
        raise ValueError(f"preset.parts must be among {', '.join(PARTS)}, got {sorted(parts)}")
    canary = {int(preset.canary_bank): f"canaries:{int(preset.canaries)}"}
    target = int(preset.backdoor_target)
    trigger = str(preset.get("backdoor_trigger") or backdoor.TRIGGER)
    boost = str(preset.get("backdoor_with") or "")  # e.g. scale:5+inflate:10: a model-replacement attack
    backdoor_bank = {int(preset.backdoor_bank): f"backdoor:{target}:{trigger}" + (f"+{boost}" if boost else "")}
    keep = ["federation.checkpoints_kept=100"]
    separate = bool(preset.get("backdoor_sim"))  # the backdoor rows' own federation (`backdoor_sim` on `sim`)
    result: dict[str, Any] = {"membership": [], "operator_view": [], "backdoor": [], "backdoor_bank": backdoor_bank}
    rocs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    scorer: Scorer | None = None

    def scorer_for(folder: Path, cfg: DictConfig) -> Scorer:
        nonlocal scorer
        scorer = scorer or Scorer(config_dict(cfg.model), load_bank(folder / "federation" / "test").train.class_names)
        return scorer

    if "membership" in parts or ("backdoor" in parts and not separate):
        for epsilon in [None, *[float(e) for e in preset.epsilons]]:
            name = "none" if epsilon is None else f"eps{epsilon:g}"
            folder = run_dir / f"federation_{name}"
            cfg, history = train(preset, folder, [*keep, *privacy_overrides(preset, epsilon)], canary | backdoor_bank)
            attacker = scorer_for(folder, cfg)
            if "membership" in parts:
                result["membership"].extend(membership_rows(attacker, preset, folder, cfg, history, epsilon, rocs))
            if "backdoor" in parts and (
                (epsilon is None and not separate) or (epsilon is not None and math.isclose(epsilon, 8.0))
            ):
                defence = "none" if epsilon is None else "dp_eps8"
                result["backdoor"].append(backdoor_rows(attacker, folder, defence, target, trigger))
    if "backdoor" in parts:
        # the floor: the undefended federation with the backdoor bank honest, scored with the same trigger
        runs: list[tuple[str, str, list[str], int]] = [("floor", "none (no backdoor bank)", [], 0)]
        if separate:  # the backdoor's own federation, without the canaries
            runs.append(("none", "none", [], 1))
        runs += [(name, f"checks+{name}", extra, 1) for name, extra in defence_overrides(preset).items()]
        for name, defence, extra, hostile in runs:
            setting = [*preset.backdoor_sim] if separate else []
            folder = run_dir / f"{'backdoor' if separate else 'federation'}_{name}"
            behaviours = (backdoor_bank if hostile else {}) | ({} if separate else canary)
            private = [] if any(o.startswith("privacy=") for o in extra) else ["privacy=none"]  # a defence may be DP
            cfg, _ = train(preset, folder, [*setting, *keep, *private, *extra], behaviours)
            row = backdoor_rows(scorer_for(folder, cfg), folder, defence, target, trigger, hostile)
            result["backdoor"].append(row | (hostile_fate(folder, int(preset.backdoor_bank)) if hostile else {}))
    if "operator_view" in parts:
        for view, privacy in (("plaintext", None), ("dp_eps8", 8.0)):
            folder = run_dir / f"operator_{view}"
            extra = [*preset.operator_sim, *privacy_overrides(preset, privacy)]
            cfg, _ = train(preset, folder, extra, {0: f"canaries:{int(preset.canaries)}"})
            result["operator_view"].extend(operator_rows(scorer_for(folder, cfg), preset, folder, cfg, view))
        result["operator_view"].extend(he_rows())
    result["seconds"] = time.perf_counter() - started
    (run_dir / AUDIT_JSON).write_text(json.dumps(jsonable(result), indent=2), encoding="utf-8")
    if rocs:
        plot_roc(rocs, run_dir / "roc.png")
    if result["backdoor"]:
        plot_backdoor(result["backdoor"], run_dir / "backdoor.png")
    (run_dir / AUDIT_MD).write_text(markdown(result), encoding="utf-8")
    return result


def membership_rows(
    scorer: Scorer,
    preset: DictConfig,
    folder: Path,
    cfg: DictConfig,
    history: History,
    epsilon: float | None,
    rocs: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[dict[str, Any]]:
    """The canary attack on the run's published global model and, without DP, on the canary bank's update."""
    name = "none" if epsilon is None else f"eps{epsilon:g}"
    bank = load_bank(folder / "federation" / "banks" / f"bank_{int(preset.canary_bank):02d}").name
    spent = spent_by_bank(history).get(bank)
    spent_eps = None if epsilon is None else (spent.epsilon if spent else math.nan)
    row, scores = membership_row(scorer, state_of(folder / FINAL_STATE), preset, spent_eps, epsilon, "global")
    rows = [row]
    rocs[f"global, {name}"] = scores
    if epsilon is None:  # the operator's view of a plaintext run: the canary bank's own update
        update = canary_update(scorer, preset, folder, cfg)
        row, scores = membership_row(scorer, update, preset, None, None, "bank_update")
        rows.append(row)
        rocs[f"bank update, {name}"] = scores
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Privacy and robustness audit",
        "",
        "## Membership inference (canaries, offline LiRA score with a population null)",
        "",
        "Model attacked: the published global model, or the canary bank's own update (the operator's view",
        "of a plaintext run).",
        "",
        "| privacy | model | eps target | eps spent | canaries | AUC | TPR@FPR 1% | eps lower (95%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["membership"]:
        lines.append(
            f"| {r['privacy']} | {r['model']} | {figure(r['epsilon_target'], 3)} | {figure(r['epsilon_spent'], 3)} | "
            f"{r['canaries']} | "
            f"{figure(r['mia_auc'], 3)} | {figure(r['tpr_at_fpr_0_01'], 3)} | {figure(r['epsilon_lower'], 3)} |"
        )
    lines += ["", "## What the operator learns from one update", "", "| view | attack | success |", "|---|---|---|"]
    lines += [f"| {r['view']} | {r['attack']} | {figure(r['success'], 3)} |" for r in result["operator_view"]]
    lines += [
        "",
        "Under HE the operator holds ciphertext only; its attacks have no input (chance).",
        "",
        "## Backdoor bank",
        "",
        "Attack success: non-target test records the model classifies right without the trigger, classified",
        "as the target with it (out of `counted`); beside it the share of all non-target records classified",
        "as the target with and without the trigger (the model's baseline). The row with no hostile bank is",
        "the floor: what the trigger phrase alone does to a model that never saw it. The bound is the one-sided",
        "95% Clopper-Pearson upper bound on the success from the records counted. The hostile bank's rounds:",
        "its train replies the server took as sent / bounded / refused; its share: of the train rows.",
        "",
        f"The backdoor bank's behaviour: `{next(iter(result.get('backdoor_bank', {}).values()), '')}`.",
        "",
        "| defence | banks | hostile | attack success (counted, 95% upper bound) | target rate triggered / untriggered "
        "| clean accuracy | hostile bank's rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['defence']} | {r['banks']} | {r['hostile']} | {figure(r['success_rate'], 3)} ({r['counted']}, "
        f"<= {figure(r['success_upper'], 3)}) | "
        f"{figure(r['triggered_target_rate'], 3)} / "
        f"{figure(r['untriggered_target_rate'], 3)} | {figure(r['clean_accuracy'], 3)} | {fate(r)} |"
        for r in result["backdoor"]
    ]
    lines += ["", "![ROC](roc.png) ![backdoor](backdoor.png)", ""]
    return "\n".join(lines)


def fate(row: dict[str, Any]) -> str:
    if "hostile_accepted" not in row:
        return "-"
    share = f"{row['hostile_share']:.1%}"
    return f"{row['hostile_accepted']} / {row['hostile_bounded']} / {row['hostile_refused']} (share {share})"


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=120)
    table = Table(title="fingpt-audit")
    for column in ("part", "setting", "figure", "value"):
        table.add_column(column)
    for r in result["membership"]:
        setting = (
            f"{r['privacy']} {r['model']} eps={figure(r['epsilon_target'], 3)} spent={figure(r['epsilon_spent'], 3)}"
        )
        table.add_row(
            "membership",
            setting,
            "AUC / TPR@1% / eps_lower",
            f"{figure(r['mia_auc'], 3)} / {figure(r['tpr_at_fpr_0_01'], 3)} / {figure(r['epsilon_lower'], 3)}",
        )
    for r in result["operator_view"]:
        table.add_row("operator view", r["view"], r["attack"], figure(r["success"], 3))
    for r in result["backdoor"]:
        table.add_row(
            "backdoor",
            f"{r['defence']} ({r['banks']} banks, {r['hostile']} hostile)",
            "success (n) / target rate trig, untrig / clean acc",
            f"{figure(r['success_rate'], 3)} ({r['counted']}) / {figure(r['triggered_target_rate'], 3)}, "
            f"{figure(r['untriggered_target_rate'], 3)} / {figure(r['clean_accuracy'], 3)}",
        )
    console.print(table)


@hydra.main(config_path=str(CONFIG_DIR), config_name="audit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = audit(cfg.preset, run_dir)
    except (CheckpointError, DataError, ValueError) as error:
        sys.exit(f"fingpt-audit: error: {error}")
    print_table(result)
    print(f"audit: {run_dir / AUDIT_MD} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
