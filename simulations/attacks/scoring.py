"""The attacker's use of a model: per-record logits of a federated state on given texts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fingpt_federated.data.batching import make_loader
from fingpt_federated.data.records import BankDataset
from fingpt_federated.model.build import build_model
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.state import federated_state, load_federated_state


class Scorer:
    """One model of the run's architecture, loaded with whichever state is attacked."""

    def __init__(self, model_cfg: Mapping[str, Any], class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.model, self.tokenizer = build_model(model_cfg, len(class_names), 0)
        self.initial = {k: v.clone() for k, v in federated_state(self.model).items()}
        self.model.eval()

    def load(self, state: Mapping[str, Any]) -> HybridFinGPT:
        load_federated_state(self.model, state)
        return self.model

    @torch.no_grad()
    def logits(self, state: Mapping[str, Any], texts: list[str], labels: np.ndarray) -> torch.Tensor:
        model = self.load(state)
        data = BankDataset(texts=list(texts), series=None, mask=None, labels=labels, class_names=self.class_names)
        out = [
            model(**batch.inputs()).float()
            for batch in make_loader(data, self.tokenizer, model.config.max_length, 64, shuffle=False)
        ]
        return torch.cat(out)

    def losses(self, state: Mapping[str, Any], texts: list[str], labels: np.ndarray) -> np.ndarray:
        logits = self.logits(state, texts, labels)
        return F.cross_entropy(logits, torch.as_tensor(labels, dtype=torch.long), reduction="none").numpy()

    def confidences(self, state: Mapping[str, Any], texts: list[str]) -> np.ndarray:
        """Logit-scaled confidence of every class, log(p_c / (1 - p_c)) = z_c - logsumexp(z without c), per
        record (rows) and class (columns): the statistic LiRA models as Gaussian (Carlini et al. 2022)."""
        z = self.logits(state, texts, np.zeros(len(texts), dtype=np.int64)).double()
        others = z.unsqueeze(1).expand(-1, z.shape[1], -1).clone()
        others[:, torch.arange(z.shape[1]), torch.arange(z.shape[1])] = -torch.inf
        return (z - torch.logsumexp(others, dim=2)).numpy()

    def predictions(self, state: Mapping[str, Any], texts: list[str]) -> np.ndarray:
        return self.logits(state, texts, np.zeros(len(texts), dtype=np.int64)).argmax(dim=1).numpy()
