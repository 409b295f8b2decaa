"""Building blocks of the series encoder and the fusion, made of nn.Linear and nn.LayerNorm only.

Opacus computes per-sample gradients through hooks on known layer types; a bare nn.Parameter or
nn.MultiheadAttention would leave parameters without them. Hence attention is written out here,
and even the fusion gate is an nn.Linear (applied to a constant input of ones).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Attention(nn.Module):
    """Multi-head attention of `x` over `context` where `allowed` (broadcastable to B, Lq, Lk) is True.

    A query row with no allowed key gets uniform weights instead of NaN; callers discard it.
    """

    def __init__(self, d_query: int, d_context: int, d_inner: int, d_out: int, heads: int, dropout: float) -> None:
        super().__init__()
        if d_inner % heads:
            raise ValueError(f"attention width {d_inner} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(d_query, d_inner)
        self.key = nn.Linear(d_context, d_inner)
        self.value = nn.Linear(d_context, d_inner)
        self.out = nn.Linear(d_inner, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        weights = self.dropout(F.softmax(scores, dim=-1))
        mixed = (weights @ v).transpose(1, 2).flatten(2)
        return self.out(mixed)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_in)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


class Gate(nn.Module):
    """tanh(alpha) per channel, alpha = 0 at start (Flamingo): the block begins as the identity.

    alpha is the weight of a bias-free nn.Linear(1, dim) fed ones, so Opacus sees a Linear layer.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Linear(1, dim, bias=False)
        nn.init.zeros_(self.alpha.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones(x.shape[0], 1, 1)
        return torch.tanh(self.alpha(ones)) * x
