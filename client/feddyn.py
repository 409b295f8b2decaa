"""FedDyn's bank side (Acar et al. 2021): a linear term that makes the banks' local optima agree.

Each bank k keeps g_k (zeros at first), an estimate of its own loss gradient at its local optimum,
and in every round minimises, from the global state x it was sent,

    L_k(w) - <g_k, w> + (alpha / 2) · ||w - x||²,

then moves g_k <- g_k - alpha · (y - x), y its trained state. The quadratic term is FedProx's with
mu = alpha (client/proximal.py); the linear term is applied as FedProx's is, added to the gradient
just before each optimizer step (grad -= g_k), so that both stay loss terms for the optimizer
(AdamW's normalisation included), as in the paper and in Flower's FedDyn baseline (depthfl). The
server keeps the matching h and corrects the average (server/feddyn.py). The bank keeps g_k in its
state folder, one file per run, as SCAFFOLD's c_i (client/scaffold.py's load_variate/save_variate).
Under DP the terms run after the noise, and g_k depends only on noised steps: no budget is spent.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from fingpt_federated.model.state import covered_trainable_parameters

State = Mapping[str, torch.Tensor]


def add_linear_term(optimizer: Optimizer, model: nn.Module, gradient: State) -> RemovableHandle:
    """Before every step of `optimizer`, grad -= gradient[name] for each parameter with a gradient; `.remove()` it."""
    params = covered_trainable_parameters(model, gradient, "FedDyn's linear term")
    pairs = [(p, gradient[name].to(device=p.device, dtype=p.dtype)) for name, p in params.items()]

    def correct(_optimizer: Optimizer, _args: tuple, _kwargs: dict) -> None:
        with torch.no_grad():
            for p, term in pairs:
                if p.grad is not None:
                    p.grad.sub_(term)

    stepping = getattr(optimizer, "original_optimizer", optimizer)  # an Opacus DPOptimizer steps its inner one
    return stepping.register_step_pre_hook(correct)


def updated_gradient(gradient: State, sent: State, trained: State, alpha: float) -> dict[str, torch.Tensor]:
    """g_k - alpha · (y - x) for the global state x sent and the trained state y."""
    return {name: gradient[name].float() - alpha * (trained[name].float() - sent[name].float()) for name in gradient}
