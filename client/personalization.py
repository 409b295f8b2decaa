"""A bank's personalised model: the final global model with a local part fine-tuned on the bank's own rows.

FedRep (Collins et al. 2021) and Ditto (Li et al. 2021) keep a part of each bank's model local; here
that part is fine-tuned once, after the federation, for `steps` optimizer steps on the bank's train
split, starting from the final global model:
- `head`: the classification head only (FedRep's split): the shared representation stays as the
  federation made it; a few thousand weights that a small bank cannot overfit in a few steps. The default.
- `head+lora`: the head and the backbone's LoRA adapters: more room to adapt, and to overfit.

The fine-tuning uses plain cross-entropy even where the federation trains with logit adjustment:
the federation keeps the shared model from learning any one bank's label prior, while a bank's own
model should learn its own prior, which is much of what it gains under label skew.

With `label_prior` the head first learns the bank's label mix in one step that no fine-tuning of a
few steps can take: the output bias is shifted by the vector b that minimises the cross-entropy of
the global model's logits + b on the bank's train rows (Saerens et al. 2002 adapt a classifier to a
new class prior this way; a model trained with logit adjustment, as for TFNS, scores as if the classes
were balanced, and b puts the bank's prior back). b has one number per class: fitted by L-BFGS on
logits computed once, in well under a second, with a weak L2 penalty (one pseudo-row's worth) so a
class missing from the bank's rows is made rare, not impossible. An AdamW step moves the bias by
about the learning rate, so 20 steps at 2e-3 move it by 0.04, where a 98%-neutral bank needs ~4.

The bank keeps whichever of the global model, the global model with its label prior, and the
fine-tuned one is best on its own validation split (by `train.monitor`; a tie goes to the more
personal one): a small bank whose fine-tuned adapters overfit keeps at least its label prior. The
validation split is never trained on, and the bank's test split is never looked at here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from fingpt_federated.client.training import LOWER_IS_BETTER, train_local
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.evaluation import evaluate, logits_of
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.state import federated_state, load_federated_state, trainable_parameters
from fingpt_federated.model.train_config import TrainConfig

HEAD = "head"
HEAD_AND_LORA = "head+lora"


def local_part(model: nn.Module, part: str) -> list[str]:
    """The names of the federated tensors a bank personalises: the head's, and with `head+lora` the LoRA adapters'."""
    if part not in (HEAD, HEAD_AND_LORA):
        raise ValueError(f"personalized part must be {HEAD!r} or {HEAD_AND_LORA!r}, got {part!r}")
    names = [
        name
        for name in trainable_parameters(model)
        if name.startswith("head.") or (part == HEAD_AND_LORA and "lora_" in name)
    ]
    if not names:
        raise ValueError(f"the model has no trainable tensors in its {part!r} part")
    return sorted(names)


@contextmanager
def only_trainable(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Within the block, only the trainable tensors in `names` require a gradient (and are stepped)."""
    frozen = [p for name, p in trainable_parameters(model).items() if name not in names]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


GLOBAL = "global"
PRIOR = "label prior"
TUNED = "fine-tuned"


@dataclass(frozen=True)
class Personalization:
    choice: str
    """The model the bank keeps, the best on its validation split: GLOBAL, PRIOR (the global model with
    the bank's label prior, only with `label_prior`) or TUNED (its local part fine-tuned); ties go to
    the more personal one. Without a validation split always TUNED."""
    label_prior: bool
    """Whether the head's bias was fitted to the bank's label mix before the fine-tuning."""
    steps: int
    seconds: float
    valid_global: dict[str, float] | None
    valid_personalised: dict[str, float] | None
    """The fine-tuned model's validation metrics."""
    valid_prior: dict[str, float] | None = None

    @property
    def kept(self) -> bool:
        """Whether anything personal was kept (else the bank's model is the global one)."""
        return self.choice != GLOBAL


def personalize(
    model: HybridFinGPT,
    tokenizer: PreTrainedTokenizerBase,
    train: BankDataset,
    valid: BankDataset | None,
    cfg: TrainConfig,
    *,
    part: str,
    steps: int,
    label_prior: bool = False,
) -> Personalization:
    """Fine-tune `part` of `model` (holding the global state) in place on `train`; the rest stays untouched.

    With `label_prior` the head's bias first fits the bank's label mix (fit_label_prior). The model is
    left holding the choice (Personalization.choice).
    """
    names = local_part(model, part)
    scored = _Candidates(model, tokenizer, valid, cfg)
    scored.add(GLOBAL)
    if label_prior:
        fit_label_prior(model, tokenizer, train, cfg.eval_batch_size)
        scored.add(PRIOR)
    epochs = math.ceil(steps / math.ceil(len(train) / cfg.batch_size))
    local = replace(cfg, logit_adjustment=0.0, epochs=epochs, max_steps=None, progress=False)
    with only_trainable(model, names):
        result = train_local(model, tokenizer, train, local, max_steps=steps)
    scored.add(TUNED)
    choice = scored.keep_best()
    return Personalization(
        choice,
        label_prior,
        result.steps,
        result.seconds,
        scored.metrics[GLOBAL],
        scored.metrics[TUNED],
        scored.metrics.get(PRIOR),
    )


class _Candidates:
    """The states a bank tried, each with its validation metrics; keeps the best in the model."""

    def __init__(
        self, model: HybridFinGPT, tokenizer: PreTrainedTokenizerBase, valid: BankDataset | None, cfg: TrainConfig
    ) -> None:
        self.model, self.tokenizer, self.valid, self.cfg = model, tokenizer, valid, cfg
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.metrics: dict[str, dict[str, float] | None] = {}

    def add(self, name: str) -> None:
        self.states[name] = federated_state(self.model)
        valid = self.valid
        self.metrics[name] = (
            None if valid is None else evaluate(self.model, self.tokenizer, valid, self.cfg.eval_batch_size)
        )

    def keep_best(self) -> str:
        """Load the best candidate by the monitored metric (ties to the later one); return its name."""
        best = next(iter(self.states))
        for name, metrics in self.metrics.items():
            reference = self.metrics[best]
            if (
                metrics is None
                or reference is None
                or not _worse(metrics[self.cfg.monitor], reference[self.cfg.monitor], self.cfg.monitor)
            ):
                best = name
        load_federated_state(self.model, self.states[best])
        return best


def fit_label_prior(
    model: HybridFinGPT, tokenizer: PreTrainedTokenizerBase, train: BankDataset, batch_size: int
) -> torch.Tensor:
    """Shift the model's logits by the b minimising cross-entropy(logits + b) + |b|^2 / 2n on `train`; return b."""
    logits = logits_of(model, tokenizer, train, batch_size)
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    shift = torch.zeros(logits.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([shift], max_iter=100, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits + shift, labels) + shift.square().sum() / (2 * len(labels))
        loss.backward()
        return loss

    optimizer.step(objective)
    model.shift_logits(shift.detach())
    return shift.detach()


def _worse(value: float, reference: float, monitor: str) -> bool:
    return value > reference if monitor in LOWER_IS_BETTER else value < reference
