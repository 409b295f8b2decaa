"""FedProx as a gradient correction: grad += mu * (w - w_global), just before each optimizer step.

FedProx's proximal term (mu/2)·||w - w_global||² is usually added to the loss. Under Opacus that
breaks: in hooks mode the optimizer replaces p.grad with the clipped, noised per-sample sum, so
a loss term is silently dropped (and mis-scaled in ghost-clipping mode). Its gradient is
data-independent, so it can be added after the noise at no privacy cost. Hence a step pre-hook,
registered on the optimizer that actually steps: an Opacus DPOptimizer calls its
`original_optimizer.step()` after clipping and noising, so the hook goes on that inner optimizer
(found automatically here). Without Opacus it is the optimizer itself.

Only parameters that received a gradient are corrected: a module the batch did not use (say the
fusion on text-only data) is left alone, as the optimizer leaves it alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from fingpt_federated.model.state import as_tensor, covered_trainable_parameters


def add_proximal_correction(
    optimizer: Optimizer,
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor | np.ndarray],
    mu: float,
) -> RemovableHandle:
    """Register the correction for every trainable parameter of `model`; remove it with `.remove()`."""
    if mu < 0:
        raise ValueError(f"proximal mu must be >= 0, got {mu}")
    params = covered_trainable_parameters(model, global_state, "the global state")
    anchors = [
        (p, as_tensor(global_state[name]).to(device=p.device, dtype=p.dtype, copy=True)) for name, p in params.items()
    ]

    def correct(_optimizer: Optimizer, _args: tuple, _kwargs: dict) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    stepping = getattr(optimizer, "original_optimizer", optimizer)
    return stepping.register_step_pre_hook(correct)
