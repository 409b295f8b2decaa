"""What travels between banks and the server, and how a whole trained model is saved.

The federated state is exactly the trainable tensors (LoRA adapters, term offsets, series
encoder, fusion, head), sorted by name so that every party packs them in the same order. The
schema hash (names, shapes, dtypes) lets a receiver reject a state built for another model
before touching any weight. Normaliser statistics and the frozen backbone never travel.

A saved model is a folder: `config.json` (model config, classes, features, schema hash) and
`model.safetensors` (every non-backbone tensor, normaliser buffers included). The backbone is
rebuilt from its config (a local path or a deterministic shortcut), never copied.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from fingpt_federated.model.build import build_model
from fingpt_federated.model.hybrid import HybridFinGPT

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class StateSchemaError(ValueError):
    """A state does not fit the model: names missing or unexpected, or shapes that differ."""


class NonFiniteState(ValueError):
    """A state holds NaN or infinite values: it is never loaded into a model, resumed from or published."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside an Opacus GradSampleModule (or any wrapper keeping it as `_module`)."""
    while isinstance(inner := getattr(model, "_module", None), nn.Module):
        model = inner
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by their federated-state name (wrappers such as Opacus's removed)."""
    return {name: p for name, p in _unwrap(model).named_parameters() if p.requires_grad}


def covered_trainable_parameters(model: nn.Module, tensors: Mapping[str, object], what: str) -> dict[str, nn.Parameter]:
    """The trainable parameters, once `tensors` (`what`: e.g. "the global state") is known to hold one for each."""
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise KeyError(f"{what} lacks {len(missing)} trainable tensor(s), e.g. {missing[:3]}")
    return params


def as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value


def federated_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Detached CPU copies of exactly the trainable tensors, sorted by name."""
    params = trainable_parameters(model)
    return OrderedDict((name, params[name].detach().to("cpu", copy=True)) for name in sorted(params))


def _dtype_name(value: torch.Tensor | np.ndarray) -> str:
    return str(value.dtype).removeprefix("torch.")


def state_schema_hash(state: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """sha256 over (name, shape, dtype) in name order: equal hashes mean exchangeable states."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        digest.update(f"{name}|{tuple(value.shape)}|{_dtype_name(value)}\n".encode())
    return digest.hexdigest()


def nonfinite_tensors(state: Mapping[str, torch.Tensor | np.ndarray]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity, sorted."""
    return [name for name in sorted(state) if not _finite(state[name])]


def _finite(value: torch.Tensor | np.ndarray) -> bool:
    if isinstance(value, np.ndarray):
        return not np.issubdtype(value.dtype, np.inexact) or bool(np.isfinite(value).all())
    return not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all())


def check_finite(state: Mapping[str, torch.Tensor | np.ndarray], what: str) -> None:
    """Raise NonFiniteState naming the tensors of `state` (described as `what`) that are not finite."""
    bad = nonfinite_tensors(state)
    if bad:
        raise NonFiniteState(
            f"{what} holds non-finite values (NaN or inf) in {len(bad)} of {len(state)} tensors: {_some(bad)}"
        )


def load_federated_state(model: nn.Module, state: Mapping[str, torch.Tensor | np.ndarray]) -> None:
    """Copy a federated state into the model in place (any device; floats cast to the parameter dtype).

    Raises StateSchemaError naming every missing, unexpected and mis-shaped tensor, and
    NonFiniteState naming every tensor with a NaN or an infinity; on error nothing has been written.
    """
    params = trainable_parameters(model)
    problems = _schema_problems(params, state)
    if problems:
        raise StateSchemaError(
            f"federated state does not fit the model (expected schema {state_schema_hash(params)[:12]}, "
            f"got {state_schema_hash(state)[:12]}): {problems}"
        )
    check_finite(state, "the federated state")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(as_tensor(state[name]).to(device=p.device, dtype=p.dtype))


def _schema_problems(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    """'' when both have the same names and shapes, else every difference in one line."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    misshaped = [
        f"{name} (model {tuple(expected[name].shape)}, state {tuple(got[name].shape)})"
        for name in sorted(set(expected) & set(got))
        if tuple(got[name].shape) != tuple(expected[name].shape)
    ]
    return "; ".join(
        f"{label} {len(names)}: {_some(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if names
    )


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... (+{len(names) - limit} more)"


def save_model(model: HybridFinGPT, folder: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors; `metadata` (e.g. class names) goes into the config."""
    hybrid = _unwrap(model)
    if not isinstance(hybrid, HybridFinGPT):
        raise TypeError(f"save_model saves a HybridFinGPT, got a {type(hybrid).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in hybrid.own_state().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {
        "format_version": FORMAT_VERSION,
        "model": hybrid.config.to_dict(),
        "num_classes": hybrid.num_classes,
        "num_features": hybrid.num_features,
        "federated_schema": state_schema_hash(federated_state(hybrid)),
        "metadata": dict(metadata or {}),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def load_model(folder: str | Path) -> tuple[HybridFinGPT, PreTrainedTokenizerBase]:
    """Rebuild a model saved by `save_model` (on the CPU); its outputs equal the saved model's."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} has format version {config.get('format_version')}, expected {FORMAT_VERSION}")
    model, tokenizer = build_model(config["model"], config["num_classes"], config["num_features"])
    schema = state_schema_hash(federated_state(model))
    if schema != config["federated_schema"]:
        saved = config["federated_schema"][:12]
        raise StateSchemaError(f"{folder} was saved with schema {saved}, its config rebuilds {schema[:12]}")
    tensors = load_file(str(folder / WEIGHTS_FILE))
    problems = _schema_problems(model.own_state(), tensors)
    if problems:
        raise StateSchemaError(f"{folder / WEIGHTS_FILE} does not fit its config.json: {problems}")
    model.load_state_dict(tensors, strict=False)
    return model, tokenizer
