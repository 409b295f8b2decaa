"""Fusion of text and series: text token states attend to series states (gated cross-attention).

This is Flamingo's gated cross-attention dense block, placed on top of the backbone's final
states: each text token queries the series, the answer is added through a tanh gate that starts
at zero, then a gated feed-forward layer mixes the two per token. At initialisation the block is
the identity, so a pretrained text model is not disturbed; the gates open as far as the series
helps. A record without any real series step passes through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from fingpt_federated.model.config import FusionSettings
from fingpt_federated.model.layers import MLP, Attention, Gate


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, d_text: int, d_series: int, settings: FusionSettings) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_text)
        self.attn = Attention(d_text, d_series, settings.d_model, d_text, settings.heads, settings.dropout)
        self.attn_gate = Gate(d_text)
        self.ln_mlp = nn.LayerNorm(d_text)
        self.mlp = MLP(d_text, settings.d_model, settings.dropout)
        self.mlp_gate = Gate(d_text)

    def forward(self, text: torch.Tensor, series: torch.Tensor, series_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d_text) text states attend to the real steps of (B, T, d_series) series states."""
        x = text + self.attn_gate(self.attn(self.ln_attn(text), series, series_mask[:, None, :]))
        x = x + self.mlp_gate(self.mlp(self.ln_mlp(x)))
        has_series = series_mask.any(dim=1)[:, None, None]
        return torch.where(has_series, x, text)


class Fusion(nn.Module):
    def __init__(self, d_text: int, d_series: int, settings: FusionSettings) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            GatedCrossAttentionBlock(d_text, d_series, settings) for _ in range(settings.layers)
        )

    def forward(self, text: torch.Tensor, series: torch.Tensor, series_mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            text = block(text, series, series_mask)
        return text
