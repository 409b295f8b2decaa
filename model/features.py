"""Static features as tokens (FT-Transformer style), the context the text attends to beside the series.

Numeric feature i becomes the token  x_i · w_i + b_i  (x_i standardised after a signed log1p, as the
series are: amounts are heavy-tailed); categorical feature j becomes  E_j[value] + f_j. One
transformer block then lets the tokens see each other. Output: (B, F, d_model), one token per
feature in the order numeric then categorical, so an attribution per token is one per feature.

Fitted on a bank's training rows only (`fit`), as buffers that are saved and published with the
weights but never averaged: the numeric mean and standard deviation, and a vocabulary per
categorical feature. The vocabulary is a table of `slots` entries addressed by the category hash
(data/features.py) modulo `slots`; an entry holds the hash of the training value that owns it. A
value whose hash is not in its slot (unseen in training, or a rarer value colliding with a seen
one) takes the shared "unknown" row 0 of its embedding, never an error. Because the slot is a
function of the value, every bank puts the same category in the same row without sharing a list,
so the federated embeddings mean the same thing everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fingpt_federated.model.config import FeatureEncoderSettings
from fingpt_federated.model.series import CLAMP, CausalBlock


class FeatureEncoder(nn.Module):
    # buffers (register_buffer below), declared for the type checker
    mean: torch.Tensor
    std: torch.Tensor
    vocabulary: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self, numeric: list[str], categorical: list[str], d_model: int, heads: int, settings: FeatureEncoderSettings
    ) -> None:
        super().__init__()
        self.numeric_names, self.categorical_names = list(numeric), list(categorical)
        self.slots = settings.slots
        n_num, n_cat = len(numeric), len(categorical)
        self.register_buffer("mean", torch.zeros(n_num))
        self.register_buffer("std", torch.ones(n_num))
        self.register_buffer("vocabulary", torch.zeros(n_cat, settings.slots, dtype=torch.long))
        self.register_buffer("fitted", torch.tensor(False))
        # nn.Embedding rows indexed per sample: Opacus computes their per-sample gradients
        self.value_weight = nn.Embedding(max(n_num, 1), d_model)
        self.value_bias = nn.Embedding(max(n_num, 1), d_model)
        self.category = nn.Embedding(max(n_cat, 1) * (settings.slots + 1), d_model)
        self.feature = nn.Embedding(max(n_cat, 1), d_model)
        for table in (self.value_bias, self.feature):
            nn.init.normal_(table.weight, std=0.02)
        self.blocks = nn.ModuleList(CausalBlock(d_model, heads, settings.dropout) for _ in range(settings.layers))
        self.ln_out = nn.LayerNorm(d_model)

    @property
    def names(self) -> list[str]:
        return [*self.numeric_names, *self.categorical_names]

    @torch.no_grad()
    def fit(self, numeric: np.ndarray, categorical: np.ndarray) -> None:
        """Statistics and vocabulary of a bank's training rows (raw numbers, category hashes)."""
        if len(numeric) == 0 and len(categorical) == 0:
            raise ValueError("cannot fit the feature encoder on no rows")
        if self.numeric_names:
            x = _squash(torch.as_tensor(np.asarray(numeric), dtype=torch.float64))
            self.mean.copy_(x.mean(0).float())
            self.std.copy_(x.std(0, correction=0).clamp_min(1e-6).float())
        self.vocabulary.zero_()
        for j in range(len(self.categorical_names)):
            for value in sorted(set(np.asarray(categorical)[:, j].tolist())):  # ascending: the same owner everywhere
                slot = value % self.slots
                if int(self.vocabulary[j, slot]) == 0:
                    self.vocabulary[j, slot] = value
        self.fitted.fill_(True)

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        """(B, Fn) raw numbers and (B, Fc) category hashes -> (B, Fn + Fc, d_model) feature tokens."""
        if not bool(self.fitted):
            raise RuntimeError("the feature encoder is not fitted: call model.fit_features on the training rows first")
        batch = len(numeric) if self.numeric_names else len(categorical)
        tokens = []
        if self.numeric_names:
            x = ((_squash(numeric.float()) - self.mean) / self.std).clamp(-CLAMP, CLAMP)
            ids = torch.arange(len(self.numeric_names), device=x.device).expand(batch, -1)
            tokens.append(x.unsqueeze(-1) * self.value_weight(ids) + self.value_bias(ids))
        if self.categorical_names:
            tokens.append(self.category(self._rows(categorical)) + self.feature(self._feature_ids(batch)))
        x = torch.cat(tokens, dim=1)
        allowed = torch.ones(batch, x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_out(x)

    def _rows(self, hashes: torch.Tensor) -> torch.Tensor:
        """Embedding rows: feature j's block starts at j·(slots+1); row 0 of a block is "unknown"."""
        slot = hashes.remainder(self.slots)
        known = self.vocabulary.unsqueeze(0).expand(len(hashes), -1, -1).gather(2, slot.unsqueeze(-1)).squeeze(-1)
        index = torch.where(known == hashes, slot + 1, torch.zeros_like(slot))
        offsets = torch.arange(len(self.categorical_names), device=hashes.device) * (self.slots + 1)
        return index + offsets

    def _feature_ids(self, batch: int) -> torch.Tensor:
        return torch.arange(len(self.categorical_names), device=self.vocabulary.device).expand(batch, -1)


def _squash(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def fit_features_on(model: nn.Module, data: object) -> None:
    """Fit `model`'s feature encoder on `data` (a bank's training BankDataset) when both have features
    and it is not fitted yet; the one call every trainer and evaluator makes beside the series fit."""
    encoder = getattr(model, "features", None)
    static = getattr(data, "features", None)
    if isinstance(encoder, FeatureEncoder) and static is not None and not bool(encoder.fitted):
        encoder.fit(static.numeric, static.categorical)
