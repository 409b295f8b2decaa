"""The `dp:` block of a privacy config, validated, with a bank's own budget laid over it.

The federation's config sets the defaults every bank trains with (clipping norm, batch sizes,
learning rate). The privacy budget, however, is each bank's decision about its own customers:
a bank may set its own `target_epsilon`, `delta`, `noise_multiplier`, `accountant`,
`planned_rounds` and whether it reports validation metrics (`report_validation`), either in the
config's `banks:` table (keyed by bank name) or in its own node configuration (`overrides`). It
may not switch DP off or change how updates are computed.

`DPConfig` (these settings plus the `banks:` table) is the schema of `privacy.dp` (conf/schema.py)
and the only copy of its defaults: conf/privacy/dp.yaml only switches DP on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fingpt_federated.model.lr_schedule import cosine
from fingpt_federated.structured_config import build

ACCOUNTANTS = ("prv", "rdp")
BUDGET_KEYS = frozenset(
    {"target_epsilon", "delta", "noise_multiplier", "accountant", "planned_rounds", "report_validation"}
)
"""What a bank may set for itself."""


@dataclass
class DPSettings:
    """Differentially private local training of one bank (Opacus DP-SGD).

    Exactly how much noise: `noise_multiplier` when given, else calibrated once, ahead of the
    first round, so that `planned_rounds` rounds of local steps spend at most `target_epsilon`.
    `target_epsilon` is also the bank's budget: a round that would exceed it is refused.
    """

    enabled: bool = False
    target_epsilon: float | None = 8.0
    """The bank's budget for the whole run (and the calibration target)."""
    delta: float = 1e-5
    """Keep well below 1/records of the smallest bank."""
    noise_multiplier: float | None = None
    """Set to skip calibration (the ledger still accounts for it exactly)."""
    max_grad_norm: float = 1.0
    """Per-sample clipping bound (L2 over all trainable tensors). With model.train.logit_adjustment a bound
    far below the minority classes' gradient norms (TFNS, MiniLM: ~5) can undo the adjustment (bench_dp:
    clip 1 under AdamW fell to the majority class; SGD at clip 2 did not)."""
    accountant: str = "prv"
    """prv (tighter) or rdp; fixed for a run once a ledger exists."""
    logical_batch_size: int = 256
    """Expected Poisson batch: each record is in a step's batch with probability ~ this / n."""
    physical_batch_size: int = 32
    """Largest batch one forward/backward holds in memory (Opacus BatchMemoryManager)."""
    planned_rounds: int | None = None
    """Rounds this bank expects to train, for calibrating the noise; None: the run's rounds."""
    lr: float | None = 2e-3
    """Learning rate under DP, replacing train.lr (noisy, large-batch steps want a larger one); None keeps
    train.lr."""
    lr_final: float | None = None
    """With `lr`: the learning rate decays by a cosine across rounds, from `lr` in round 1 to this in
    round `planned_rounds` (which the server sets to the run's rounds); None keeps `lr` every round."""
    optimizer: str | None = None
    """Optimizer under DP (adamw | sgd); None keeps train.optimizer. SGD with momentum sums the
    noisy gradients, so noise averages out over steps; Adam restarted every round takes its first
    steps at full size in every coordinate, the noisy ones too (bench_dp measured both)."""
    weight_decay: float | None = None
    """Weight decay under DP; None keeps train.weight_decay. torch's SGD decays through the gradient
    (L2), so the decay is scaled by the learning rate and the momentum: train.weight_decay 0.01, meant
    for AdamW's decoupled decay at lr ~1e-3 (2e-5 per step), pulls every trainable weight ~6.5% towards
    zero per 5-step round under SGD at dp.lr 0.5 and momentum 0.9."""
    secure_mode: bool = False
    """Opacus secure mode: cryptographically safe noise and sampling (slower; for production)."""
    label_prior_noise: float = 20.0
    """Noise std of the one-off Gaussian release of the bank's label counts, which the logit-adjusted
    loss (train.logit_adjustment > 0) needs; charged to the bank's budget before calibration."""
    report_validation: bool = False
    """Whether the bank answers federated evaluation with the global model's metrics on its
    validation split. Those metrics are computed from customer records without noise, outside
    the DP guarantee, so by default the bank reports only its validation row count."""

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError(f"dp.delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"dp.target_epsilon must be > 0 or null, got {self.target_epsilon}")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError(f"dp.noise_multiplier must be > 0 or null, got {self.noise_multiplier}")
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("dp needs a target_epsilon (to calibrate the noise) or a noise_multiplier")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp.accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"dp.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 1 <= self.physical_batch_size <= self.logical_batch_size:
            raise ValueError(
                f"dp.physical_batch_size ({self.physical_batch_size}) must be between 1 and "
                f"dp.logical_batch_size ({self.logical_batch_size})"
            )
        if self.planned_rounds is not None and self.planned_rounds < 1:
            raise ValueError(f"dp.planned_rounds must be >= 1 or null, got {self.planned_rounds}")
        if self.label_prior_noise <= 0:
            raise ValueError(f"dp.label_prior_noise must be > 0, got {self.label_prior_noise}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"dp.lr must be > 0 or null, got {self.lr}")
        if self.lr_final is not None and (self.lr is None or self.lr_final <= 0):
            raise ValueError(f"dp.lr_final must be > 0 and needs dp.lr, got lr_final {self.lr_final}, lr {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"dp.weight_decay must be >= 0 or null, got {self.weight_decay}")
        if not isinstance(self.report_validation, bool):
            raise ValueError(f"dp.report_validation must be true or false, got {self.report_validation!r}")
        if self.optimizer not in (None, "adamw", "sgd"):
            raise ValueError(f"dp.optimizer must be adamw, sgd or null, got {self.optimizer!r}")

    def lr_in_round(self, server_round: int | None) -> float | None:
        """`lr` in round `server_round` (from 1): the cosine from `lr` to `lr_final` over `planned_rounds`
        rounds when both are set, else `lr`."""
        if self.lr is None or self.lr_final is None or server_round is None:
            return self.lr
        if not self.planned_rounds or self.planned_rounds < 2:
            return self.lr
        return cosine(self.lr, self.lr_final, server_round, self.planned_rounds)

    @classmethod
    def from_mapping(
        cls,
        cfg: Mapping[str, Any] | None,
        *,
        bank: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> DPSettings:
        """From a `dp:` block over the defaults; then the `banks[bank]` entry, then `overrides` (the bank's own).

        Unknown keys and wrong types are errors, and so is a bank overriding anything but its budget.
        """
        block = build(DPConfig, cfg, "privacy.dp")
        table = block.banks
        settings = cls(**{f.name: getattr(block, f.name) for f in fields(cls)})
        layers = ((f"dp.banks.{bank}", table.get(bank) if bank else None), ("the bank's overrides", overrides))
        for source, layer in layers:
            if layer:
                settings = settings.with_budget(layer, source=source)
        return settings

    def with_budget(self, budget: Mapping[str, Any], *, source: str = "budget") -> DPSettings:
        """These settings with a bank's budget keys replaced (and re-validated)."""
        foreign = sorted(set(budget) - BUDGET_KEYS)
        if foreign:
            raise ValueError(f"{source} may only set {sorted(BUDGET_KEYS)}, not {foreign}")
        return replace(self, **dict(budget))


@dataclass
class DPConfig(DPSettings):
    """The `privacy.dp` block: the federation's settings and the per-bank budget table.

    A bank's own budget, either here by bank name or in its SuperNode's node config (dp-target-epsilon,
    dp-delta, dp-noise-multiplier, dp-accountant, dp-planned-rounds, dp-report-validation); only
    BUDGET_KEYS may be set per bank, e.g. `+privacy.dp.banks.bank_03.target_epsilon=3`.
    """

    banks: dict[str, dict[str, Any]] = field(default_factory=dict)


def budget_from_flat(config: Mapping[str, Any], prefix: str = "dp-") -> dict[str, Any]:
    """A bank's budget keys from a flat key-value config (`dp-target-epsilon` -> target_epsilon).

    Keys without the prefix are ignored; a prefixed key that is not a budget key is an error,
    so a misspelt `dp-target-epsilion` does not silently leave the default budget in place.
    """
    budget = {}
    for key, value in config.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :].replace("-", "_")
        if name not in BUDGET_KEYS:
            known = sorted(prefix + k.replace("_", "-") for k in BUDGET_KEYS)
            raise ValueError(f"{key!r} is not a privacy budget key; known: {known}")
        budget[name] = value
    return budget
