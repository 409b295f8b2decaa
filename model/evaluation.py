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
def evaluate(
    model: HybridFinGPT, tokenizer: PreTrainedTokenizerBase, data: BankDataset, batch_size: int = 64
) -> dict[str, float]:
    """loss, accuracy and macro_f1; roc_auc too for binary tasks (NaN if only one class is present)."""
    check_compatible(model, data)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = []
    for batch in make_loader(data, tokenizer, model.config.max_length, batch_size, shuffle=False):
        logits.append(model(**batch.to(device).inputs()).float().cpu())
    model.train(was_training)
    all_logits = torch.cat(logits)
    labels = torch.as_tensor(data.labels, dtype=torch.long)
    predicted = all_logits.argmax(dim=1).numpy()
    metrics = {
        "loss": F.cross_entropy(all_logits, labels).item(),
        "accuracy": float((predicted == data.labels).mean()),
        "macro_f1": float(
            f1_score(data.labels, predicted, labels=list(range(model.num_classes)), average="macro", zero_division=0)
        ),
    }
    if model.num_classes == 2:
        positive = all_logits.softmax(dim=1)[:, 1].numpy()
        both = len(np.unique(data.labels)) == 2
        metrics["roc_auc"] = float(roc_auc_score(data.labels, positive)) if both else math.nan
    return metrics


def check_compatible(model: HybridFinGPT, data: BankDataset) -> None:
    if data.num_classes != model.num_classes:
        raise ValueError(f"data has {data.num_classes} classes, the model {model.num_classes}")
    if data.series is not None and data.num_features != model.num_features:
        raise ValueError(f"data has {data.num_features} series features, the model {model.num_features}")
