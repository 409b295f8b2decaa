"""Opacus readiness: every trainable parameter gets a per-sample gradient (DP-SGD needs them all)."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch.nn import functional as F

from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state

pytestmark = pytest.mark.usefixtures("tiny_setting")

BATCH = 5


@pytest.mark.parametrize("backbone", ["tiny-encoder", "tiny-decoder"])
def test_every_trainable_parameter_gets_a_per_sample_gradient(backbone):
    model, tokenizer = build_model(
        {
            "backbone": backbone,
            "series_encoder": {"d_model": 16, "layers": 1, "heads": 2},
            "fusion": {"d_model": 16, "heads": 2},
            "vocabulary": {"trainable_delta": True},
        },
        3,
        2,
    )
    texts = ["EBITDA up at $JPM", "CDS wider", "VaR breach", "buyback", "$AAPL guidance cut"]
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    series = torch.randn(BATCH, 7, 2)
    mask = torch.ones(BATCH, 7, dtype=torch.bool)
    mask[2, 4:] = False
    model.fit_normalizer(series, mask)
    with torch.no_grad():  # open the gates so that every fusion parameter is on the gradient path
        for block in model.fusion.blocks:
            block.attn_gate.alpha.weight.fill_(0.5)
            block.mlp_gate.alpha.weight.fill_(0.5)
    model.train()
    private = GradSampleModule(model, loss_reduction="sum")

    text_and_series = private(ids["input_ids"], ids["attention_mask"], series, mask)
    series_only = private(series=series, series_mask=mask)  # reaches series_proj
    labels = torch.arange(BATCH) % 3
    loss = F.cross_entropy(text_and_series, labels, reduction="sum")
    loss = loss + F.cross_entropy(series_only, labels, reduction="sum")
    loss.backward()

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(federated_state(private))
    lacking = [name for name, p in trainable.items() if getattr(p, "grad_sample", None) is None]
    assert not lacking, f"no per-sample gradient for {lacking}"
    for name, p in trainable.items():
        assert p.grad_sample.shape == (BATCH, *p.shape), name
        assert torch.allclose(p.grad_sample.sum(0), p.grad, atol=1e-5), name
