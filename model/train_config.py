"""The `train:` block of a model config: how a model is trained locally (the bank, the baselines).

`TrainConfig` is the schema of `model.train` (conf/schema.py) and the only copy of its defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fingpt_federated.structured_config import build

OPTIMIZERS = ("adamw", "sgd")
MONITORS = ("loss", "accuracy", "macro_f1", "roc_auc")


@dataclass
class TrainConfig:
    """The `train:` block of a model config, field for field."""

    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 5e-4
    batch_size: int = 32
    epochs: int = 3
    max_steps: int | None = None  # cap on optimizer steps (a federated round sets its own)
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    patience: int | None = 2  # evaluations without improvement before early stopping; None = never
    monitor: str = "loss"  # loss | accuracy | macro_f1 | roc_auc
    eval_batch_size: int = 64
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # auto = cuda when present, else cpu
    logit_adjustment: float = 0.0
    """tau of the logit-adjusted loss against label skew across banks (0 = plain cross-entropy; under
    DP the label counts are released with noise, privacy.dp.label_prior_noise)."""

    def __post_init__(self) -> None:
        if self.logit_adjustment < 0:
            raise ValueError(f"train.logit_adjustment must be >= 0, got {self.logit_adjustment}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"train.monitor must be one of {MONITORS}, got {self.monitor!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | TrainConfig) -> TrainConfig:
        """From a `train:` DictConfig or dict over the defaults; unknown keys and wrong types are errors."""
        if isinstance(cfg, TrainConfig):
            return cfg
        return build(cls, cfg, "model.train")
