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

The bank keeps the fine-tuned part only if the result is no worse than the global model on its own
validation split (by `train.monitor`); otherwise its personalised model is the global model. The
validation split is never trained on, and the bank's test split is never looked at here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from torch import nn
from transformers import PreTrainedTokenizerBase

from fingpt_federated.client.training import LOWER_IS_BETTER, train_local
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.features import fit_features_on
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


def fit_to_bank(model: HybridFinGPT, train: BankDataset) -> None:
    """The statistics a bank fits on its own train rows (series normaliser, static features), refitted."""
    if train.series is not None and train.mask is not None:  # BankDataset: a series has its mask
        model.fit_normalizer(train.series, train.mask)
    if model.features is not None:
        model.features.fitted.fill_(False)  # refitted on this bank's rows
    fit_features_on(model, train)


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


@dataclass(frozen=True)
class Personalization:
    kept: bool
    """Whether the fine-tuned part was kept (no worse than the global model on the bank's validation split)."""
    steps: int
    seconds: float
    valid_global: dict[str, float] | None
    valid_personalised: dict[str, float] | None


def personalize(
    model: HybridFinGPT,
    tokenizer: PreTrainedTokenizerBase,
    train: BankDataset,
    valid: BankDataset | None,
    cfg: TrainConfig,
    *,
    part: str,
    steps: int,
) -> Personalization:
    """Fine-tune `part` of `model` (holding the global state) in place on `train`; the rest stays untouched.

    Without `valid` the fine-tuned part is always kept.
    """
    names = local_part(model, part)
    start = federated_state(model)
    before = evaluate(model, tokenizer, valid, cfg.eval_batch_size) if valid is not None else None
    epochs = math.ceil(steps / math.ceil(len(train) / cfg.batch_size))
    local = replace(cfg, logit_adjustment=0.0, epochs=epochs, max_steps=None, progress=False)
    with only_trainable(model, names):
        result = train_local(model, tokenizer, train, local, max_steps=steps)
    after = evaluate(model, tokenizer, valid, cfg.eval_batch_size) if valid is not None else None
    kept = before is None or after is None or not _worse(after[cfg.monitor], before[cfg.monitor], cfg.monitor)
    if not kept:
        load_federated_state(model, start)
    return Personalization(kept, result.steps, result.seconds, before, after)


def _worse(value: float, reference: float, monitor: str) -> bool:
    return value > reference if monitor in LOWER_IS_BETTER else value < reference
