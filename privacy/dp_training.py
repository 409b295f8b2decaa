"""Make one round of a bank's local training differentially private with Opacus DP-SGD.

`make_private` takes the trainer's own model, optimizer and loader and returns a `PrivateRound`:
Poisson sampling of logical batches, per-sample clipping to `max_grad_norm` and Gaussian noise,
with an Opacus PrivacyEngine whose accountant is restored from the bank's ledger (so epsilon
composes across rounds and restarts) and a round charged in that ledger before the first step.
Used as a context manager it always settles the ledger with the steps really taken and detaches
Opacus from the model, which a ClientApp reuses for the next bank or round.

The model is not wrapped (Opacus `wrap_model=False`): hooks are attached to it, so the trainer
keeps calling it, and its parameter names, as before. Large logical batches come in physical
pieces of at most `physical_batch_size` (`PrivateRound.physical_batches`, Opacus's
BatchMemoryManager); the optimizer steps, noises and accounts once per logical batch. An
empty Poisson batch arrives as None and is stepped with `PrivateRound.empty_step()`.

Anything that must change the gradient *after* the noise (FedProx's data-independent proximal
correction) goes in a step pre-hook of the optimizer that really steps: `stepping_optimizer`,
`register_post_noise_hook`. A loss term would be replaced by Opacus's noisy clipped sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from torch.utils.hooks import RemovableHandle

from fingpt_federated.privacy.dp_accounting import Spend, history_of, sample_rate_for
from fingpt_federated.privacy.dp_budget import PrivacyLedger, noise_multiplier_for
from fingpt_federated.privacy.dp_settings import DPSettings


@dataclass(frozen=True)
class DPTask:
    """What a trainer needs to make one round private: the bank's settings and ledger, and the round."""

    settings: DPSettings
    ledger: PrivacyLedger
    round_label: str
    server_round: int | None = None
    """The federation round (from 1), for a learning rate that changes across rounds (dp.lr_final)."""
    planned_rounds: int | None = None
    """Rounds to calibrate the noise for (default: settings.planned_rounds)."""
    seed: int | None = None
    """Reproducible sampling and noise, for tests only (see make_private)."""


class StateUnchangedError(RuntimeError):
    """Trainable tensors did not move in a round that took steps (the failure of Opacus issue 820)."""


@dataclass
class PrivateRound:
    """The Opacus objects of one private round; use `optimizer` and `physical_batches()` to train."""

    optimizer: DPOptimizer
    loader: DataLoader
    """Poisson-sampled logical batches (expected size `logical_batch_size`)."""
    engine: PrivacyEngine
    hooks: AbstractGradSampleHooks
    ledger: PrivacyLedger
    noise_multiplier: float
    sample_rate: float
    physical_batch_size: int
    projected_epsilon: float
    """Epsilon after this round if it takes all the steps it reserved."""
    steps_before: int
    """Steps in the ledger before this round."""
    epsilon: float | None = None
    """Epsilon spent after the round, once finished."""

    @property
    def steps(self) -> int:
        """Noisy optimizer steps taken in this round so far."""
        return sum(spend.steps for spend in history_of(self.engine.accountant)) - self.steps_before

    @contextmanager
    def physical_batches(self) -> Iterator[DataLoader]:
        """The logical batches cut into physical ones; call optimizer.step() after every one."""
        with BatchMemoryManager(
            data_loader=self.loader, max_physical_batch_size=self.physical_batch_size, optimizer=self.optimizer
        ) as loader:
            yield loader

    def empty_step(self) -> None:
        """The step of an empty Poisson batch (the loader gives None): noise only, accounted as any.

        Skipping it instead would change the sampling the accountant assumes.
        """
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()

    def finish(self) -> float:
        """Detach Opacus from the model and settle the ledger; returns epsilon spent. Idempotent."""
        if self.epsilon is None:
            self.hooks.cleanup()
            for p in self.optimizer.params:
                p.grad = None
                if hasattr(p, "summed_grad"):
                    del p.summed_grad
            self.epsilon = self.ledger.end_round(history_of(self.engine.accountant))
        return self.epsilon

    def __enter__(self) -> PrivateRound:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish()


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,
    settings: DPSettings,
    ledger: PrivacyLedger,
    *,
    round_label: str,
    steps: int,
    planned_rounds: int | None = None,
    seed: int | None = None,
) -> PrivateRound:
    """Wire Opacus DP-SGD into (model, optimizer, loader) for a round of at most `steps` steps.

    `loader` must batch `settings.logical_batch_size` records (it becomes Poisson sampling at
    that expected size). The noise is `settings.noise_multiplier`, else calibrated once for
    `planned_rounds` (default `settings.planned_rounds`) rounds of `steps` steps. Raises
    BudgetExceeded, before any training and with the model left as it was, when the round
    would take the bank past its budget.

    Poisson sampling and noise draw from generators seeded from the operating system, never
    from the training seed: that seed is in the federation's config, and whoever knows it can
    replay the noise and subtract it. `seed` makes a round reproducible, for tests only;
    `settings.secure_mode` uses Opacus's cryptographic generator instead (needs torchcsprng).
    """
    if loader.batch_size != settings.logical_batch_size:
        raise ValueError(
            f"the loader batches {loader.batch_size} records, dp.logical_batch_size is {settings.logical_batch_size}"
        )
    if (settings.accountant, settings.delta) != (ledger.accountant, ledger.delta):
        raise ValueError(
            f"settings ({settings.accountant}, delta {settings.delta}) differ from the ledger's "
            f"({ledger.accountant}, delta {ledger.delta})"
        )
    dataset = loader.dataset
    if not isinstance(dataset, Sized):
        raise TypeError("DP-SGD samples from a map-style data set: the loader's data set has no length")
    sample_rate = sample_rate_for(len(dataset), settings.logical_batch_size)
    rounds = planned_rounds if planned_rounds is not None else settings.planned_rounds
    if settings.noise_multiplier is None and ledger.plan is None and rounds is None:
        raise ValueError("calibrating the noise needs the planned rounds (dp.planned_rounds or planned_rounds=)")
    sigma = noise_multiplier_for(
        ledger, configured=settings.noise_multiplier, sample_rate=sample_rate, planned_steps=steps * (rounds or 1)
    )
    accountant = ledger.opacus_accountant()
    projected = ledger.begin_round(round_label, Spend(sigma, sample_rate, steps))
    model.train()
    engine = PrivacyEngine(accountant=ledger.accountant, secure_mode=settings.secure_mode)
    engine.accountant = accountant
    hooks = None
    try:
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True,
            noise_generator=None if settings.secure_mode else _generator(seed, _device_of(optimizer)),
            wrap_model=False,
        )
        if dp_loader.sample_rate != sample_rate:
            raise RuntimeError(f"Opacus samples at rate {dp_loader.sample_rate}, the ledger planned {sample_rate}")
        dp_loader.collate_fn = _EmptyAsNone(loader.collate_fn)
        if not settings.secure_mode:
            dp_loader.batch_sampler.generator = _generator(None if seed is None else seed + 1, torch.device("cpu"))
    except BaseException:
        if hooks is not None:
            hooks.cleanup()
        ledger.end_round(ledger.history, status="failed before training")
        raise
    return PrivateRound(
        optimizer=dp_optimizer,
        loader=dp_loader,
        engine=engine,
        hooks=hooks,
        ledger=ledger,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        physical_batch_size=settings.physical_batch_size,
        projected_epsilon=projected,
        steps_before=sum(spend.steps for spend in ledger.history),
    )


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded with `seed`, or with 63 bits from os.urandom."""
    generator = torch.Generator(device=device)
    return generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)


def _device_of(optimizer: Optimizer) -> torch.device:
    return optimizer.param_groups[0]["params"][0].device


class _EmptyAsNone:
    """Collate an empty Poisson batch to None, for `PrivateRound.empty_step`.

    A model cannot run on zero rows in general, and Opacus's own empty-batch collate only
    rebuilds tensors, dicts and lists, not a trainer's batch objects.
    """

    def __init__(self, collate: Callable[[list], Any]) -> None:
        self.collate = collate

    def __call__(self, items: list) -> Any:
        return None if len(items) == 0 else self.collate(items)


def stepping_optimizer(optimizer: Optimizer) -> Optimizer:
    """The optimizer that updates the weights: a DPOptimizer's inner one, else `optimizer` itself."""
    return getattr(optimizer, "original_optimizer", optimizer)


def register_post_noise_hook(optimizer: Optimizer, hook: Callable[[Optimizer], None]) -> RemovableHandle:
    """Call `hook(stepping optimizer)` before every real update: after clipping and noise under DP.

    Under BatchMemoryManager the inner optimizer steps once per logical batch, so the hook runs
    once per noisy step. Whatever it adds to `p.grad` is data-independent or it costs privacy.
    """
    return stepping_optimizer(optimizer).register_step_pre_hook(lambda opt, _args, _kwargs: hook(opt))


def assert_state_changed(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
) -> None:
    """Raise StateUnchangedError naming every tensor of `names` (default: all of `before`) that did not move.

    With DP every stepped tensor gets noise, so one that is bit-for-bit unchanged after a round
    with steps was never updated: Opacus issue 820, where LoRA weights stay put while loss and
    epsilon look normal.
    """
    names = list(before if names is None else names)
    missing = sorted(set(names) - set(after))
    if missing:
        raise KeyError(f"the state after training lacks {missing[:5]}")
    frozen = [name for name in names if torch.equal(before[name], after[name])]
    if frozen:
        raise StateUnchangedError(
            f"{len(frozen)} of {len(names)} trainable tensors did not change in training, e.g. {frozen[:5]}: "
            "the optimizer never updated them (is every trainable parameter in it and reached by Opacus?)"
        )
