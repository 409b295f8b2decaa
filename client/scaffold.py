"""SCAFFOLD's bank side (Karimireddy et al. 2020): a control variate that corrects the bank's drift.

On label-skewed banks every bank's local steps pull the global model towards its own optimum, and
the average of those pulls is not the step the pooled data would take. SCAFFOLD keeps two control
variates per tensor: the bank's own, c_i (an estimate of its own update direction), and the
server's, c (the banks' mean). Every local step is corrected by c - c_i, so each bank moves along
the federation's direction plus its own gradient's deviation from its usual one.

Here the correction is applied to the parameters right after each optimizer step,
w -= lr · (c - c_i), instead of to the gradient before it: with plain SGD that is the same step
(SCAFFOLD's), and with AdamW (this project's default) it keeps c and c_i in the units of a step
rather than feeding them to Adam's per-coordinate normalisation, where a gradient-sized
correction would be rescaled out of proportion. After K steps at rate lr from the global state
x to y, the bank's new variate is SCAFFOLD's option II,

    c_i+ = c_i - c + (x - y) / (K · lr),

which with the correction applied this way is exactly the mean direction of the K optimizer steps
themselves (the correction cancels out): the bank's usual update, per step. The bank keeps c_i in
its state folder (one file per run) and sends c_i+ - c_i, from which the server moves c.
Only parameters that got a gradient are corrected, as in client/proximal.py; under DP the
correction runs after the noise and, depending only on c, c_i and the noised steps, costs no budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from fingpt_federated.model.state import covered_trainable_parameters

State = Mapping[str, torch.Tensor]


def add_drift_correction(optimizer: Optimizer, model: nn.Module, correction: State) -> RemovableHandle:
    """After every step of `optimizer`, w -= lr · correction[name] for each stepped parameter; `.remove()` it."""
    params = covered_trainable_parameters(model, correction, "the drift correction")
    stepping = getattr(optimizer, "original_optimizer", optimizer)  # an Opacus DPOptimizer steps its inner one
    rates = {id(p): group for group in stepping.param_groups for p in group["params"]}
    pairs = [
        (p, correction[name].to(device=p.device, dtype=p.dtype), rates[id(p)])
        for name, p in params.items()
        if id(p) in rates
    ]

    def correct(_optimizer: Optimizer, _args: tuple, _kwargs: dict) -> None:
        with torch.no_grad():
            for p, term, group in pairs:
                if p.grad is not None:
                    p.sub_(term, alpha=float(group["lr"]))

    return stepping.register_step_post_hook(correct)


def correction(server: State, bank: State) -> dict[str, torch.Tensor]:
    """c - c_i, tensor by tensor."""
    return {name: server[name].float() - bank[name].float() for name in server}


def updated_variate(
    bank: State, server: State, sent: State, trained: State, steps: int, lr: float
) -> dict[str, torch.Tensor]:
    """SCAFFOLD's option II: c_i - c + (x - y) / (K · lr) for the global state x sent and the trained y."""
    if steps < 1 or lr <= 0:
        return {name: bank[name].float().clone() for name in server}  # no step: nothing learnt about the bank
    scale = 1.0 / (steps * lr)
    return {
        name: bank[name].float() - server[name].float() + (sent[name].float() - trained[name].float()) * scale
        for name in server
    }


def load_variate(path: Path, like: State) -> dict[str, torch.Tensor]:
    """The bank's c_i saved at `path`, or zeros shaped as `like` (the server's c) in its first round."""
    if not path.exists():
        return {name: torch.zeros_like(value, dtype=torch.float32) for name, value in like.items()}
    saved = load_file(str(path))
    if set(saved) != set(like) or any(saved[name].shape != like[name].shape for name in like):
        raise ValueError(f"{path} holds control variates of another model than this run's: move it aside")
    return saved


def save_variate(path: Path, variate: State) -> None:
    """Write c_i atomically (a crash mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({name: value.contiguous() for name, value in variate.items()}, str(partial))
    partial.replace(path)
