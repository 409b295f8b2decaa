"""A small trained and published hybrid model (tiny encoder, text + a 2-feature series) for the infer tests.

The headlines give the label away (federation_helpers.news), so a few dozen steps reach a
meaningful accuracy; the series is noise the model must still accept. The model is published
through server.publish.publish with a real config, spec (with a test set) and a history that
carries per-bank DP metrics, as a run would give them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from federation_helpers import CLASSES, config, news
from omegaconf import OmegaConf

from fingpt_federated.client.training import train_local
from fingpt_federated.data.bank_data import BankData, save_bank
from fingpt_federated.data.config import DataConfig
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.data.records import BankDataset
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.server.history import CENTRAL, FEDERATION, History
from fingpt_federated.server.publish import publish

FEATURES = {"price": ["p1", "p2", "p3"], "volume": ["v1", "v2", "v3"]}
DATA = {
    "name": "keyword_news",
    "encoding": "utf-8",
    "text": {"column": "text"},
    "label": {"column": "sentiment", "classes": list(CLASSES)},
    "series": {"layout": "wide", "features": FEATURES},
    "split": {"test_fraction": 0.2, "valid_fraction": 0.15, "seed": 0},
}
EPSILONS = {"bank_a": 2.5, "bank_b": 3.75}


def write_table(path: Path, rows: int, seed: int, *, labels: bool = True, texts: list[str] | None = None) -> Path:
    """A CSV under DATA: keyword headlines, their sentiment, and two 3-step noise series."""
    data = news(rows, [1 / 3] * 3, seed)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"text": texts or data.texts})
    if labels:
        frame["sentiment"] = [CLASSES[y] for y in data.labels]
    for columns in FEATURES.values():
        for column in columns:
            frame[column] = rng.lognormal(3, 1, rows).round(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def load_table(path: Path) -> BankDataset:
    return load_dataset({**DATA, "files": {"train": str(path)}})


def history() -> History:
    """Two rounds of two banks under DP, and the central test metrics of each round."""
    result = History()
    for server_round in (1, 2):
        for bank, epsilon in EPSILONS.items():
            result.add(server_round, "train", bank, {"loss": 0.5, "epsilon": epsilon * server_round / 2, "delta": 1e-5})
        result.add(server_round, "train", FEDERATION, {"loss": 0.5})
        result.add(server_round, CENTRAL, CENTRAL, {"accuracy": 0.5 + 0.2 * server_round, "loss": 0.4})
    return result


def train_and_publish(root: Path, variants: list[str], steps: int = 60) -> Path:
    """Train the tiny hybrid model on a keyword table, then publish it with `variants` into root/model."""
    cfg = config("federation.rounds=2", "model.train.progress=false")
    cfg.data = OmegaConf.merge(OmegaConf.structured(DataConfig), DATA)  # a typed node takes a typed value
    train = load_table(write_table(root / "train.csv", 480, seed=1))
    test = load_table(write_table(root / "test.csv", 200, seed=2))
    model, tokenizer = build_model(OmegaConf.to_container(cfg.model, resolve=True), len(CLASSES), 2)
    train_cfg = TrainConfig.from_mapping({**OmegaConf.to_container(cfg.model.train), "lr": 5e-3, "epochs": 10})
    train_local(model, tokenizer, train, train_cfg, max_steps=steps)
    test_dir = save_bank(BankData("test", test, None), root / "test")
    spec = FederationSpec(list(CLASSES), 2, str(test_dir))
    publish(
        federated_state(model),
        cfg,
        spec,
        history(),
        root / "model",
        variants,
        run=str(root),
        state_source="a test's trained state",
    )
    return root / "model"
