"""The time-series encoder: per-step numeric features -> causal transformer states.

Features are first normalised by statistics fitted on the bank's own training data (never on
validation data, and never averaged across banks: they are buffers, not federated parameters).
Financial amounts are heavy-tailed (a balance of 1e6 next to 1e2), so each value goes through a
signed log1p before standardising, and the result is clamped.

Steps are causal: step t attends to steps <= t of its own series only, so a representation never
looks into the future. Ragged series are padded at the end; `mask` is True on real steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fingpt_federated.model.config import SeriesEncoderSettings
from fingpt_federated.model.layers import MLP, Attention

CLAMP = 8.0


class SeriesNormalizer(nn.Module):
    """sign(x)·log1p(|x|), then per-feature standardisation with masked training statistics."""

    # buffers (register_buffer below), declared for the type checker
    mean: torch.Tensor
    std: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.register_buffer("fitted", torch.tensor(False))

    @staticmethod
    def _squash(x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * torch.log1p(x.abs())

    @torch.no_grad()
    def fit(self, series: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> None:
        x = self._squash(torch.as_tensor(np.asarray(series), dtype=torch.float64))
        real = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        values = x[real & torch.isfinite(x).all(-1)]
        if len(values) == 0:
            raise ValueError("cannot fit the series normaliser: no real (unmasked, finite) step")
        self.mean.copy_(values.mean(0).to(self.mean.dtype))
        self.std.copy_(values.std(0, correction=0).clamp_min(1e-6).to(self.std.dtype))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError(
                "the series normaliser is not fitted: call model.fit_normalizer(train.series, train.mask) "
                "on the bank's training data first"
            )
        return ((self._squash(x) - self.mean) / self.std).clamp(-CLAMP, CLAMP)


class CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block with masked causal self-attention."""

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, d_model, d_model, d_model, heads, dropout)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, 4 * d_model, dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.ln_attn(x)
        x = x + self.attn(h, h, allowed)
        return x + self.mlp(self.ln_mlp(x))


class SeriesEncoder(nn.Module):
    positions: torch.Tensor  # a buffer (register_buffer below), declared for the type checker

    def __init__(self, num_features: int, settings: SeriesEncoderSettings) -> None:
        super().__init__()
        self.max_steps = settings.max_steps
        self.normalizer = SeriesNormalizer(num_features)
        self.embed = nn.Linear(num_features, settings.d_model)
        self.register_buffer("positions", sinusoidal_positions(settings.max_steps, settings.d_model), persistent=False)
        self.dropout = nn.Dropout(settings.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(settings.d_model, settings.heads, settings.dropout) for _ in range(settings.layers)
        )
        self.ln_out = nn.LayerNorm(settings.d_model)

    def forward(self, series: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features and (B, T) mask -> (B, T, d_model) states, zero on padded steps."""
        steps = series.shape[1]
        if steps > self.max_steps:
            raise ValueError(f"series of {steps} steps exceed model.series_encoder.max_steps={self.max_steps}")
        x = torch.where(mask.unsqueeze(-1), series, torch.zeros((), dtype=series.dtype, device=series.device))
        x = self.dropout(self.embed(self.normalizer(x)) + self.positions[:steps])
        causal = torch.ones(steps, steps, dtype=torch.bool, device=mask.device).tril()
        allowed = causal & mask[:, None, :]
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_out(x) * mask.unsqueeze(-1)


def sinusoidal_positions(steps: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position table of Vaswani et al.: no parameters to train or noise."""
    position = torch.arange(steps, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(steps, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : dim // 2]
    return table
