"""Evaluating a hybrid model on a data set: the operator's test set, a bank's validation split, baselines."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from fingpt_federated.data.batching import make_loader
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.hybrid import HybridFinGPT


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def logits_of(
    model: HybridFinGPT, tokenizer: PreTrainedTokenizerBase, data: BankDataset, batch_size: int = 64
) -> torch.Tensor:
    """The model's class logits (rows, classes) for every row of `data`, in order, in eval mode, on the CPU."""
    check_compatible(model, data)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = []
    for batch in make_loader(data, tokenizer, model.config.max_length, batch_size, shuffle=False):
        logits.append(model(**batch.to(device).inputs()).float().cpu())
    model.train(was_training)
    return torch.cat(logits)


def evaluate(
    model: HybridFinGPT, tokenizer: PreTrainedTokenizerBase, data: BankDataset, batch_size: int = 64
) -> dict[str, float]:
    """loss, accuracy, macro_f1 and roc_auc (model/task_metrics.py; NaN where the split cannot define it)."""
    return metrics_of(logits_of(model, tokenizer, data, batch_size), np.asarray(data.labels))


def metrics_of(all_logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """`evaluate`'s metrics from logits already computed (rows, classes) and the rows' labels."""
    predicted = all_logits.argmax(dim=1).numpy()
    return {
        "loss": F.cross_entropy(all_logits, torch.as_tensor(labels, dtype=torch.long)).item(),
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(
            f1_score(labels, predicted, labels=list(range(all_logits.shape[1])), average="macro", zero_division=0)
        ),
        "roc_auc": roc_auc(labels, all_logits.softmax(dim=1).numpy()),
    }


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Binary: the AUC of the positive class's probability. More classes: the one-vs-rest macro AUC over
    the classes that have both positive and negative rows (so a split missing a class still has one).
    NaN when no class has both (a split of one class)."""
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    scores = [
        float(roc_auc_score(labels == c, probabilities[:, c])) for c in classes if 0 < (labels == c).sum() < len(labels)
    ]
    return float(np.mean(scores)) if scores else math.nan


def check_compatible(model: HybridFinGPT, data: BankDataset) -> None:
    if data.num_classes != model.num_classes:
        raise ValueError(f"data has {data.num_classes} classes, the model {model.num_classes}")
    if data.series is not None and data.num_features != model.num_features:
        raise ValueError(f"data has {data.num_features} series features, the model {model.num_features}")
