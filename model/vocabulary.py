"""Finance vocabulary: domain terms and tickers that the tokenizer keeps as whole tokens.

A general tokenizer cuts "EBITDA" into e / ##bit / ##da and "$JPM" into $ / jp / ##m. Each such
term is added as one token whose embedding row is the mean of its former pieces: a deterministic
function of the frozen backbone, so every bank computes the same row and nothing of it travels.
The rows live in the frozen embedding matrix. PEFT's `trainable_token_indices` is avoided on
purpose: Opacus computes no per-sample gradients for it. Where the terms should learn, an ordinary
`nn.Embedding` offset (`TermEmbeddingDelta`, zero at start) is added to their rows instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AddedToken, PreTrainedModel, PreTrainedTokenizerBase

FINANCE_TERMS: tuple[str, ...] = (
    "VaR",
    "CVaR",
    "CDS",
    "EBITDA",
    "EBIT",
    "EPS",
    "P/E",
    "ROE",
    "ROA",
    "ROIC",
    "YoY",
    "QoQ",
    "IPO",
    "SPAC",
    "M&A",
    "ETF",
    "REIT",
    "LIBOR",
    "SOFR",
    "FOMC",
    "CPI",
    "PPI",
    "GDP",
    "bps",
    "capex",
    "opex",
    "FCF",
    "NII",
    "NIM",
    "CET1",
    "AUM",
    "NAV",
    "OTC",
    "FX",
    "CLO",
    "MBS",
    "ABS",
    "HY",
    "IG",
    "ESG",
    "KYC",
    "AML",
    "PD",
    "LGD",
    "EAD",
    "RWA",
    "Basel",
    "buyback",
    "downgrade",
    "upgrade",
    "overweight",
    "underweight",
    "outperform",
    "underperform",
    "guidance",
    "writedown",
    "delinquency",
    "chargeoff",
    "drawdown",
    "volatility",
    "hawkish",
    "dovish",
    "stagflation",
    "bearish",
    "bullish",
)
TICKERS: tuple[str, ...] = (
    "JPM",
    "BAC",
    "C",
    "WFC",
    "GS",
    "MS",
    "AAPL",
    "MSFT",
    "AMZN",
    "GOOGL",
    "GOOG",
    "META",
    "NVDA",
    "TSLA",
    "NFLX",
    "AMD",
    "INTC",
    "BRK",
    "V",
    "MA",
    "PYPL",
    "SPY",
    "QQQ",
    "DIA",
    "IWM",
    "VIX",
    "XLF",
    "BTC",
    "ETH",
    "BA",
    "DIS",
    "XOM",
    "CVX",
    "PFE",
    "JNJ",
    "WMT",
)


def finance_terms() -> list[str]:
    """The default list: domain terms, then cashtags."""
    return [*FINANCE_TERMS, *(f"${ticker}" for ticker in TICKERS)]


def add_finance_vocabulary(
    tokenizer: PreTrainedTokenizerBase, backbone: PreTrainedModel, terms: Sequence[str] | None = None
) -> list[int]:
    """Add every term the tokenizer splits as one token initialised from its pieces.

    Returns the new token ids (consecutive). Terms that already are one token are left alone.
    """
    embeddings = _input_embeddings(backbone)
    pieces: dict[str, list[int]] = {}
    for term in finance_terms() if terms is None else terms:
        ids = tokenizer(term, add_special_tokens=False)["input_ids"]
        if len(ids) > 1:
            pieces[term] = ids
    if not pieces:
        return []
    tokenizer.add_tokens([AddedToken(term, single_word=True, normalized=True) for term in pieces])
    if len(tokenizer) > embeddings.num_embeddings:
        backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = _input_embeddings(backbone)
    new_ids = []
    with torch.no_grad():
        for term, ids in pieces.items():
            (new_id,) = tokenizer(term, add_special_tokens=False)["input_ids"]
            embeddings.weight[new_id] = embeddings.weight[ids].float().mean(0).to(embeddings.weight.dtype)
            new_ids.append(new_id)
    if new_ids != list(range(new_ids[0], new_ids[0] + len(new_ids))):
        raise RuntimeError("the tokenizer gave the finance terms non-consecutive ids")
    return new_ids


def _input_embeddings(backbone: PreTrainedModel) -> nn.Embedding:
    """The backbone's token embedding table (transformers types it as any module)."""
    embeddings = backbone.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"the backbone's input embeddings are a {type(embeddings).__name__}, not an nn.Embedding")
    return embeddings


class TermEmbeddingDelta(nn.Module):
    """A learned offset added to the input embeddings of the finance terms only (zero at start)."""

    def __init__(self, first_id: int, count: int, dim: int) -> None:
        super().__init__()
        self.first_id = first_id
        self.count = count
        self.delta = nn.Embedding(count, dim)
        nn.init.zeros_(self.delta.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        offset = input_ids - self.first_id
        is_term = (offset >= 0) & (offset < self.count)
        return self.delta(offset.clamp(0, self.count - 1)) * is_term.unsqueeze(-1)
