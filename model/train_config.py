"""The `train:` block of a model config: how a model is trained locally (the bank, the baselines)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """The `train:` block of a model config, field for field."""

    optimizer: str = "adamw"
    lr: float = 5e-4
    batch_size: int = 32
    epochs: int = 3
    max_steps: int | None = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    patience: int | None = 2
    monitor: str = "loss"
    eval_batch_size: int = 64
    seed: int = 0
    progress: bool = True
    device: str = "auto"
    logit_adjustment: float = 0.0

    def __post_init__(self) -> None:
        if self.logit_adjustment < 0:
            raise ValueError(f"train.logit_adjustment must be >= 0, got {self.logit_adjustment}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.monitor not in ("loss", "accuracy", "macro_f1", "roc_auc"):
            raise ValueError(f"train.monitor must be loss, accuracy, macro_f1 or roc_auc, got {self.monitor!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "TrainConfig") -> "TrainConfig":
        """From a `train:` DictConfig or dict; unknown keys are errors."""
        if isinstance(cfg, TrainConfig):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in train; known: {sorted(known)}")
        return cls(**{key: cfg[key] for key in cfg})
