"""Precision variants of a merged backbone, for inference.

| variant        | what                                                        | stored as                 |
| fp32           | the merged weights                                          | its own folder            |
| bf16           | every backbone weight in bfloat16                           | its own folder            |
| int8_dynamic   | torch dynamic int8 (per-channel) of every nn.Linear (CPU)   | a recipe over fp32, at load time |
| bnb_int8       | bitsandbytes LLM.int8() Linear layers                       | its own folder (pre-quantized) |
| bnb_nf4        | bitsandbytes 4-bit NormalFloat Linear layers                | its own folder (pre-quantized) |

bitsandbytes quantizes only the Linear layers; embeddings and LayerNorms stay fp32. NF4 packs
weights in blocks and needs every quantized Linear's output width divisible by 32 here, so
layers that do not fit are kept in full precision (`llm_int8_skip_modules`). bitsandbytes runs on
CUDA when present (its fast path) and also on the CPU (slower than fp32 there). torch's dynamic
int8 layers are not serialisable as safetensors, hence the recipe. Only the backbone is varied:
the series encoder, fusion and head are small and stay fp32 in every variant.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, BitsAndBytesConfig

VARIANTS = ("fp32", "bf16", "int8_dynamic", "bnb_int8", "bnb_nf4")
RECIPES = {"int8_dynamic": "fp32"}
"""Variants built at load time, and the stored variant they are built from."""
NO_BACKWARD = ("int8_dynamic",)
"""Variants whose layers have no backward (torch's quantized::linear_dynamic): a gradient through
them is silently wrong, so gradients (explanations) are taken through the fp32 weights instead."""
BNB_VARIANTS = ("bnb_int8", "bnb_nf4")
NO_CUDA = ("int8_dynamic",)
NF4_BLOCK = 32
PER_CHANNEL = torch.ao.quantization.per_channel_dynamic_qconfig
"""int8_dynamic scales each output row of a weight on its own: one scale per tensor cost 1.7 points
of accuracy on the synthetic news benchmark (0.857 against fp32's 0.873), per row none (0.873)."""


def check_variants(variants: list[str] | tuple[str, ...]) -> list[str]:
    """The variants in canonical order, fp32 always first (the source of the others); unknown ones are errors."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown model variant(s) {unknown}; known: {list(VARIANTS)}")
    return [v for v in VARIANTS if v == "fp32" or v in variants]


def stored_folder(variant: str) -> str:
    """The stored variant folder a variant loads from (a recipe loads from its source's)."""
    return RECIPES.get(variant, variant)


def default_device(variant: str) -> torch.device:
    """CUDA when a GPU is present, except for int8_dynamic (torch's dynamic int8 has CPU kernels only)."""
    if variant not in NO_CUDA and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bnb_config(variant: str, backbone: nn.Module) -> BitsAndBytesConfig:
    if variant == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    keep = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear) and module.out_features % NF4_BLOCK
    ]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=keep or None,
    )


def save_variant(fp32_folder: Path, variant: str, out: Path) -> Path:
    """Write the stored `variant` of the merged fp32 backbone saved in `fp32_folder`."""
    if variant == "bf16":
        backbone = AutoModel.from_pretrained(fp32_folder, dtype=torch.bfloat16)
    elif variant in BNB_VARIANTS:
        reference = AutoModel.from_pretrained(fp32_folder, dtype=torch.float32)
        backbone = AutoModel.from_pretrained(
            fp32_folder,
            quantization_config=bnb_config(variant, reference),
            device_map={"": default_device(variant)},
        )
    else:
        raise ValueError(f"{variant} is not a stored variant derived from fp32")
    backbone.save_pretrained(out)
    return out


def load_variant(folder: Path, variant: str, device: torch.device | None = None) -> nn.Module:
    """The frozen backbone of `variant` from its stored folder, in eval mode."""
    device = device or default_device(variant)
    if variant in BNB_VARIANTS:
        backbone = AutoModel.from_pretrained(folder, device_map={"": device})
    else:
        dtype = torch.bfloat16 if variant == "bf16" else torch.float32
        backbone = AutoModel.from_pretrained(folder, dtype=dtype).to(device)
        if variant == "int8_dynamic":
            if device.type != "cpu":
                raise ValueError("int8_dynamic runs on the CPU only")
            backbone = dynamic_int8(backbone)
    return backbone.requires_grad_(False).eval()


def dynamic_int8(backbone: nn.Module) -> nn.Module:
    """Every nn.Linear of `backbone` as torch's dynamic int8 layer (fbgemm kernels, CPU only).

    torch 2.13 deprecates `torch.ao.quantization` and its quantized tensors for torchao, but nothing
    else is faster than fp32 on a CPU here. One MiniLM Linear (384x1536, 4096 tokens, 1 thread):
    fp32 35 ms, this 14-19 ms, torchao 0.18's Int8DynamicActivationInt8Weight 55 ms (it targets
    GPUs; installed, it also prints CUDA load failures in every process that imports PEFT),
    torch._int_mm with per-token scales 58 ms, torch._weight_int8pack_mm 1628 ms. So this keeps the
    fbgemm layers and silences their two deprecation warnings here only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel", category=UserWarning
        )
        return torch.ao.quantization.quantize_dynamic(backbone, {nn.Linear: PER_CHANNEL}, dtype=torch.qint8)


def serialized_bytes(module: nn.Module) -> int:
    """Bytes of the module's state (weights, quantized packs, scales) as torch serialises it."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()
