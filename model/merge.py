"""Merging the LoRA adapters into the frozen backbone for inference (PEFT `merge_and_unload`).

After the merge the backbone is a plain Hugging Face model whose weights are W + (alpha/r)·B·A:
the same function as the adapter model (to float rounding), with no adapter layers left to
execute, and a model that can be saved, cast and quantized like any other.
"""

from __future__ import annotations

import warnings

from peft import PeftModel

from fingpt_federated.model.hybrid import HybridFinGPT


def merge_lora(model: HybridFinGPT) -> HybridFinGPT:
    """Merge the model's LoRA adapters into its backbone, in place; returns the model, in eval mode."""
    if not isinstance(model.backbone, PeftModel):
        raise TypeError(f"the backbone is a {type(model.backbone).__name__}, not a PEFT model: nothing to merge")
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model.backbone = model.backbone.merge_and_unload()
    model.backbone.requires_grad_(False)
    return model.eval()
