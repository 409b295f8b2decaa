"""The folder of a published model: everything needed to run it offline, in safetensors.

    manifest.json              how to rebuild: model config, family, classes, features, variants, data config
    hybrid.safetensors         series encoder (normaliser statistics included), fusion, projection, head: fp32
    tokenizer/                 the tokenizer, finance vocabulary included
    backbone/fp32/             the backbone with the LoRA adapters merged in (Hugging Face format)
    backbone/<variant>/        each other stored precision variant (model/quantize.py)

The backbone is the merged transformer alone; the small hybrid parts are shared by every variant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.hybrid import HybridFinGPT
from fingpt_federated.model.quantize import (
    NO_BACKWARD,
    RECIPES,
    check_variants,
    load_variant,
    save_variant,
    stored_folder,
)

FORMAT = "fingpt-published/1"
MANIFEST = "manifest.json"
HYBRID_WEIGHTS = "hybrid.safetensors"
TOKENIZER_DIR = "tokenizer"
BACKBONE_DIR = "backbone"


@dataclass
class PublishedModel:
    """A loaded published model: the hybrid model of one variant, its tokenizer and its manifest."""

    model: HybridFinGPT
    tokenizer: PreTrainedTokenizerBase
    manifest: dict[str, Any]
    variant: str
    folder: Path
    explainer: HybridFinGPT | None = None
    """For a variant without a backward: the same model on the fp32 backbone, for gradients."""

    @property
    def gradient_model(self) -> HybridFinGPT:
        """The model to differentiate: `model`, or its fp32 twin when the variant has no backward."""
        return self.explainer if self.explainer is not None else self.model

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def device(self) -> torch.device:
        return next(self.model.head.parameters()).device  # the head's Linear (its dropout has none)


def write_published(
    model: HybridFinGPT,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    variants: list[str] | tuple[str, ...],
    info: Mapping[str, Any],
) -> list[str]:
    """Save a merged model (see model.merge) and its stored variants into `folder`; returns the variants.

    `info` (class names, feature names, data config, ...) goes into the manifest as it is.
    """
    variants = check_variants(variants)
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / BACKBONE_DIR / "fp32"
    model.backbone.save_pretrained(str(fp32))  # PeftModel.save_pretrained is annotated for a str
    tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.own_state().items()}, str(folder / HYBRID_WEIGHTS))
    for variant in variants:
        if variant != "fp32" and variant not in RECIPES:
            save_variant(fp32, variant, folder / BACKBONE_DIR / variant)
    manifest = {
        "format": FORMAT,
        "model": model.config.to_dict(),
        "family": model.family,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "term_ids": _term_ids(model),
        "variants": variants,
        **info,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    return variants


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a published model: {MANIFEST} is missing")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_published(folder: str | Path, variant: str = "fp32", device: torch.device | None = None) -> PublishedModel:
    """Rebuild the hybrid model of one published variant (bitsandbytes ones on CUDA when present)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if variant not in manifest["variants"]:
        raise ValueError(f"{folder} has no variant {variant!r}; it has {manifest['variants']}")
    backbone = load_variant(folder / BACKBONE_DIR / stored_folder(variant), variant, device)
    model = _hybrid(backbone, manifest)
    _load_hybrid(model, folder / HYBRID_WEIGHTS)
    target = device or next(backbone.parameters()).device
    for name, child in model.named_children():
        if name != "backbone":
            child.to(target)
    explainer = None
    if variant in NO_BACKWARD:
        explainer = _hybrid(load_variant(folder / BACKBONE_DIR / "fp32", "fp32", target), manifest)
        for name, child in model.named_children():
            if name != "backbone":
                setattr(explainer, name, child)  # shared: only the backbone differs
        explainer.eval()
    check_finite(model, folder, variant)
    if explainer is not None:
        check_finite(explainer, folder, "fp32")
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    return PublishedModel(model.eval(), tokenizer, manifest, variant, folder, explainer)


class NonFiniteWeightsError(ValueError):
    """A published model holds NaN or infinite weights: every prediction would be NaN."""


def check_finite(model: HybridFinGPT, folder: Path, variant: str) -> None:
    """Refuse a loaded model with a NaN or infinite floating-point parameter or buffer, naming the file and tensors.

    Quantized storage (integer dtypes) is skipped: it cannot hold a non-finite value.
    """
    bad: dict[str, int] = {}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                bad[name] = count
    if bad:
        in_backbone = any(name.startswith("backbone.") for name in bad)
        where = f"{BACKBONE_DIR}/{stored_folder(variant)}" if in_backbone else HYBRID_WEIGHTS
        names = ", ".join(sorted(bad)[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteWeightsError(
            f"{folder / where}: {sum(bad.values()):,} non-finite weight(s) in {len(bad)} tensor(s) ({names}); "
            "refusing to load a damaged model"
        )


def _hybrid(backbone: torch.nn.Module, manifest: Mapping[str, Any]) -> HybridFinGPT:
    if not isinstance(backbone, PreTrainedModel):  # load_variant's AutoModel, int8_dynamic's copy included
        raise TypeError(f"a published backbone is a Hugging Face model, got a {type(backbone).__name__}")
    with torch.random.fork_rng(devices=[]):  # the hybrid parts' random init is overwritten by the caller
        return HybridFinGPT(
            backbone,
            manifest["family"],
            ModelConfig.from_mapping(manifest["model"]),
            manifest["num_classes"],
            manifest["num_features"],
            manifest["term_ids"],
        )


def _load_hybrid(model: HybridFinGPT, path: Path) -> None:
    """Load the non-backbone tensors child by child (a quantized backbone must not see this state)."""
    tensors = load_file(str(path))
    expected = model.own_state()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the manifest's model: missing {missing}, unexpected {unexpected}")
    for name, child in model.named_children():
        if name != "backbone":
            prefix = f"{name}."
            child.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)})


def _term_ids(model: HybridFinGPT) -> list[int]:
    delta = model.term_delta
    return [] if delta is None else list(range(delta.first_id, delta.first_id + delta.count))


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, as sorted relative paths (POSIX order)."""
    return sorted((p.relative_to(folder) for p in folder.rglob("*") if p.is_file()), key=lambda p: p.as_posix())


def folder_sha256(folder: Path) -> str:
    """One hash of a folder: sha256 over each file's relative path and content hash, in path order."""
    digest = hashlib.sha256()
    for relative in folder_files(folder):
        digest.update(f"{relative.as_posix()}\0{file_sha256(folder / relative)}\n".encode())
    return digest.hexdigest()


def variant_files(variant: str) -> list[str]:
    """The folder prefixes a variant reads (relative to the model folder)."""
    return [MANIFEST, HYBRID_WEIGHTS, f"{TOKENIZER_DIR}/", f"{BACKBONE_DIR}/{stored_folder(variant)}/"]
