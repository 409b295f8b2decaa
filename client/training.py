"""Local training and evaluation of the hybrid model on one bank's data.

Used by a bank training alone and by the Flower ClientApp each round. Only the trainable
tensors (the federated state) move; the backbone stays frozen. The series normaliser is fitted
on the training split it is given (if not fitted yet), never on validation data.

Early stopping: after every epoch (and at the last step) the model is evaluated on `valid`;
after `patience` evaluations without improvement of `monitor` training stops, and the best
federated state seen is restored at the end.

FedProx: with `proximal_mu > 0` the gradient of every stepped parameter gets
`mu * (w - w_global)` in an optimizer step pre-hook (see client/proximal.py for why a hook and
not a loss term). `global_state` defaults to the state the model starts from. SCAFFOLD: with
`drift_correction` every step is followed by w -= lr * (c - c_i) (client/scaffold.py). FedDyn: with
`linear_term` (g_k) every gradient gets -g_k in a pre-hook as FedProx's term (client/feddyn.py).

Label skew: with `logit_adjustment` tau > 0 the training loss is the logit-adjusted cross-entropy
of Menon et al. (2021), CE(logits + tau * log prior, y), with the prior of this bank's own
training labels (add-one smoothed). A bank that holds mostly one class then learns what tells
the classes apart instead of its own prior, which is what the FedLC line of work (Zhang et al.
2022) does against label-distribution skew: plain FedAvg over such banks collapses to the
majority class. Evaluation and inference use the raw logits. Under DP the prior is not read from
the records but from their label counts released once under the Gaussian mechanism and charged
to the bank's budget (privacy/dp_label_prior.py).

Differential privacy: with `privacy=` (a privacy.dp_training.DPTask) the round is Opacus DP-SGD
(privacy/dp_training.py): Poisson batches of `dp.logical_batch_size` records in physical pieces,
per-sample clipping and noise, the bank's ledger charged before the first step (a round over
budget raises BudgetExceeded before training) and settled after it; `dp.lr`, `dp.optimizer` and
`dp.weight_decay` replace their train counterparts, a step is one logical batch, and the FedProx
hook runs after the noise. Only the parameters this kind of data reaches are stepped (DP-SGD needs
a per-sample gradient for each), and a round whose stepped tensors did not move raises
StateUnchangedError (Opacus issue 820).
Early stopping on `valid` picks a state by un-noised validation metrics, which lies outside the
DP guarantee of those validation records (the ClientApp passes no `valid`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fingpt_federated.client.feddyn import add_linear_term
from fingpt_federated.client.proximal import add_proximal_correction
from fingpt_federated.client.scaffold import add_drift_correction
from fingpt_federated.data.batching import Batch, make_loader
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.evaluation import check_compatible, evaluate, resolve_device
from fingpt_federated.model.features import fit_features_on
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.state import (
    federated_state,
    load_federated_state,
    trainable_parameters,
)
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_label_prior import private_label_counts
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.dp_training import (
    DPTask,
    PrivateRound,
    assert_state_changed,
    make_private,
)

log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"loss"}


@dataclass
class TrainResult:
    loss: float
    """Mean training loss over all steps."""
    steps: int
    examples: int
    """Size of the training split: the weight of this bank in a FedAvg average."""
    seconds: float
    best_valid: dict[str, float] | None = None
    """Validation metrics of the restored (best) state; None without validation data."""
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    epsilon: float | None = None
    """Under DP: the bank's epsilon spent after this round (its whole run so far); else None."""
    noise_multiplier: float | None = None


def fit_to_bank(model: HybridFinGPT, train: BankDataset) -> None:
    """The statistics a bank fits on its own train rows (series normaliser, static features), refitted."""
    if train.series is not None and train.mask is not None:  # BankDataset: a series has its mask
        model.fit_normalizer(train.series, train.mask)
    if model.features is not None:
        model.features.fitted.fill_(False)  # refitted on this bank's rows
    fit_features_on(model, train)


def private_config(cfg: TrainConfig, dp: DPSettings, server_round: int | None = None) -> TrainConfig:
    """The train config under DP: batches are the logical batches; `dp.lr` (in `server_round`, see
    `DPSettings.lr_in_round`), `dp.optimizer` and `dp.weight_decay` when set."""
    lr = dp.lr_in_round(server_round)
    return replace(
        cfg,
        batch_size=dp.logical_batch_size,
        lr=lr if lr is not None else cfg.lr,
        optimizer=dp.optimizer or cfg.optimizer,
        weight_decay=dp.weight_decay if dp.weight_decay is not None else cfg.weight_decay,
    )


def reached_parameters(model: HybridFinGPT, data: BankDataset) -> list[str]:
    """Names of the trainable parameters that get a gradient from `data`'s kind of input.

    Which ones depends only on which inputs the data has: text, a series, static features (series_proj
    only serves data without text, the fusion only text with a context), so the probe is a zero-valued
    input of those kinds and no record is read. The model's feature encoder must be fitted.
    """
    device = next(model.parameters()).device
    probe: dict[str, torch.Tensor] = {}
    if data.texts is not None:
        probe["input_ids"] = torch.zeros((1, 2), dtype=torch.long, device=device)
        probe["attention_mask"] = torch.ones((1, 2), dtype=torch.long, device=device)
    if data.series is not None:
        probe["series"] = torch.zeros((1, 1, model.num_features), device=device)
        probe["series_mask"] = torch.ones((1, 1), dtype=torch.bool, device=device)
    if data.features is not None:  # hash 0 of a category is its "unknown" row
        probe["numeric"] = torch.zeros((1, data.features.numeric.shape[1]), device=device)
        probe["categorical"] = torch.zeros((1, data.features.categorical.shape[1]), dtype=torch.long, device=device)
    params = trainable_parameters(model)
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=_cuda_indices(device)):  # dropout must not move the caller's RNG
        model(**probe).sum().backward()
    reached = [name for name, p in params.items() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return reached


def build_optimizer(model: nn.Module, cfg: TrainConfig, names: list[str] | None = None) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters (only those in `names` when given)."""
    params = [p for name, p in trainable_parameters(model).items() if names is None or name in names]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_local(
    model: HybridFinGPT,
    tokenizer: PreTrainedTokenizerBase,
    train: BankDataset,
    cfg: TrainConfig,
    *,
    valid: BankDataset | None = None,
    global_state: Mapping[str, torch.Tensor] | None = None,
    proximal_mu: float = 0.0,
    drift_correction: Mapping[str, torch.Tensor] | None = None,
    linear_term: Mapping[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
    privacy: DPTask | None = None,
) -> TrainResult:
    """Train the model's trainable tensors in place on `train`; `max_steps` overrides cfg.max_steps.

    With `privacy`, the round is DP-SGD (see the module docstring) and the result carries epsilon.
    With `drift_correction` (SCAFFOLD's c - c_i per trainable tensor), every step is corrected by it
    (client/scaffold.py).
    """
    cfg = TrainConfig.from_mapping(cfg)
    if privacy is not None:
        cfg = private_config(cfg, privacy.settings, privacy.server_round)
    check_compatible(model, train)
    device = resolve_device(cfg.device)
    model.to(device)
    if train.series is not None and train.mask is not None and not model.normalizer_fitted:  # a series has its mask
        model.fit_normalizer(train.series, train.mask)
    fit_features_on(model, train)
    loader = make_loader(train, tokenizer, model.config.max_length, cfg.batch_size, shuffle=True, seed=cfg.seed)
    budget = max_steps if max_steps is not None else cfg.max_steps
    total = cfg.epochs * len(loader) if budget is None else min(budget, cfg.epochs * len(loader))
    stepped = reached_parameters(model, train) if privacy is not None else None
    optimizer = build_optimizer(model, cfg, stepped)
    before = federated_state(model)
    offsets = label_prior_offsets(train, model.num_classes, cfg.logit_adjustment, device, privacy)
    private = None
    if privacy is not None:
        private = make_private(
            model,
            optimizer,
            loader,
            privacy.settings,
            privacy.ledger,
            steps=total,
            round_label=privacy.round_label,
            planned_rounds=privacy.planned_rounds,
            seed=privacy.seed,
        )
    proximal = None
    if proximal_mu > 0:
        anchor = global_state if global_state is not None else before
        stepping = optimizer if private is None else private.optimizer  # the hook goes after the noise
        proximal = add_proximal_correction(stepping, model, anchor, proximal_mu)
    drift = None
    if drift_correction is not None:
        drift = add_drift_correction(optimizer if private is None else private.optimizer, model, drift_correction)
    linear = None
    if linear_term is not None:
        linear = add_linear_term(optimizer if private is None else private.optimizer, model, linear_term)

    stopper = _EarlyStopping(cfg.monitor, cfg.patience)
    history: list[dict[str, float]] = []
    losses: list[float] = []
    started = time.perf_counter()
    try:
        with (
            torch.random.fork_rng(devices=_cuda_indices(device)),
            tqdm(total=total, desc="train", disable=not cfg.progress, leave=False) as bar,
        ):
            torch.manual_seed(cfg.seed)
            epoch = 0
            while len(losses) < total and not stopper.stopped:
                model.train()
                if private is None:
                    steps = _plain_steps(model, optimizer, loader, device, offsets)
                else:
                    steps = _private_steps(model, private, device, offsets)
                for loss in steps:
                    losses.append(loss)
                    bar.update()
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if len(losses) >= total:
                        break
                epoch += 1
                if valid is not None:
                    metrics = evaluate(model, tokenizer, valid, cfg.eval_batch_size)
                    history.append({"epoch": epoch, "step": len(losses), **metrics})
                    log.info("epoch %d, step %d: %s", epoch, len(losses), metrics)
                    stopper.update(metrics, model)
    finally:
        if proximal is not None:
            proximal.remove()
        if drift is not None:
            drift.remove()
        if linear is not None:
            linear.remove()
        epsilon = private.finish() if private is not None else None
    if private is not None and losses:
        assert_state_changed(before, federated_state(model), stepped)
    if stopper.best_state is not None:
        load_federated_state(model, stopper.best_state)
    return TrainResult(
        loss=float(np.nanmean(losses)) if not np.isnan(losses).all() else math.nan,
        steps=len(losses),
        examples=len(train),
        seconds=time.perf_counter() - started,
        best_valid=stopper.best_metrics,
        history=history,
        stopped_early=stopper.stopped,
        epsilon=epsilon,
        noise_multiplier=None if private is None else private.noise_multiplier,
    )


def label_prior_offsets(
    data: BankDataset, num_classes: int, tau: float, device: torch.device, privacy: DPTask | None = None
) -> torch.Tensor:
    """tau * log of the add-one smoothed label prior of `data`, one value per class (zeros for tau 0).

    Under `privacy` the counts are the bank's DP release (charged once to its ledger).
    """
    if tau == 0:
        return torch.zeros(num_classes, device=device)
    if privacy is None:
        counts = np.bincount(np.asarray(data.labels, dtype=np.int64), minlength=num_classes)
    else:
        counts = private_label_counts(
            data.labels, num_classes, privacy.ledger, privacy.settings.label_prior_noise, seed=privacy.seed
        )
    smoothed = counts + 1.0
    return torch.as_tensor(tau * np.log(smoothed / smoothed.sum()), dtype=torch.float32, device=device)


def _plain_steps(
    model: HybridFinGPT,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[Batch],
    device: torch.device,
    offsets: torch.Tensor,
) -> Iterator[float]:
    """One optimizer step per batch, on the logits shifted by `offsets`; yields each step's loss."""
    for batch in loader:
        batch = batch.to(device)
        loss = F.cross_entropy(model(**batch.inputs()) + offsets, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        yield loss.item()


def _private_steps(
    model: HybridFinGPT, private: PrivateRound, device: torch.device, offsets: torch.Tensor
) -> Iterator[float]:
    """One noisy step per Poisson batch, which runs as physical pieces; yields each step's mean loss.

    Opacus clears per-sample gradients after every piece (zero_grad after step) and steps the
    weights once the logical batch is complete. An empty batch is a noise-only step (NaN loss).
    """
    losses: list[float] = []
    with private.physical_batches() as batches:
        for batch in batches:
            done = private.steps
            if batch is None:
                private.empty_step()
            else:
                batch = batch.to(device)
                loss = F.cross_entropy(model(**batch.inputs()) + offsets, batch.labels)
                loss.backward()
                private.optimizer.step()
                losses.append(loss.item())
            private.optimizer.zero_grad(set_to_none=True)
            if private.steps > done:
                yield float(np.mean(losses)) if losses else math.nan
                losses = []


class _EarlyStopping:
    """Keeps the federated state of the best evaluation; stops after `patience` worse ones."""

    def __init__(self, monitor: str, patience: int | None) -> None:
        self.monitor = monitor
        self.patience = patience
        self.sign = 1.0 if monitor in LOWER_IS_BETTER else -1.0
        self.best_score = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_metrics: dict[str, float] | None = None
        self.waited = 0
        self.stopped = False

    def update(self, metrics: dict[str, float], model: nn.Module) -> None:
        score = self.sign * metrics[self.monitor]
        if score < self.best_score:
            self.best_score, self.best_state, self.best_metrics, self.waited = score, federated_state(model), metrics, 0
            return
        self.waited += 1
        self.stopped = self.patience is not None and self.waited >= self.patience


def _cuda_indices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
