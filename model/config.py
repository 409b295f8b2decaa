"""Typed model settings, read from a Hydra `model:` group (DictConfig) or a plain dict.

Unknown keys are errors: a typo in an override must not silently fall back to a default.
The `train:` block of the same YAML file belongs to the local trainer
(`client.training.TrainConfig`) and is ignored here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

QUANTIZATIONS = ("none", "4bit")
QUANTIZATION_FALLBACKS = ("error", "full_precision")
FAMILIES = ("encoder", "decoder")


@dataclass
class LoraSettings:
    """LoRA on the frozen backbone. `target_modules=None` picks the family default."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    freeze_lora_a: bool = False


@dataclass
class SeriesEncoderSettings:
    """The small causal transformer over per-step numeric features."""

    d_model: int = 64
    layers: int = 2
    heads: int = 4
    max_steps: int = 256
    dropout: float = 0.1


@dataclass
class FusionSettings:
    """Gated cross-attention from text tokens to series steps; `d_model` is its inner width."""

    heads: int = 4
    d_model: int = 128
    layers: int = 1
    dropout: float = 0.1


@dataclass
class VocabularySettings:
    """Finance terms as whole tokens; `trainable_delta` adds a learned offset per term."""

    enabled: bool = True
    trainable_delta: bool = False


@dataclass
class ModelConfig:
    backbone: str = "minilm"
    family: str | None = None
    max_length: int = 64
    head_dropout: float = 0.1
    seed: int = 0
    quantization: str = "none"
    quantization_fallback: str = "error"
    lora: LoraSettings = field(default_factory=LoraSettings)
    series_encoder: SeriesEncoderSettings = field(default_factory=SeriesEncoderSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    vocabulary: VocabularySettings = field(default_factory=VocabularySettings)

    def __post_init__(self) -> None:
        if self.family not in (None, *FAMILIES):
            raise ValueError(f"model.family must be one of {FAMILIES} or null, got {self.family!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization_fallback not in QUANTIZATION_FALLBACKS:
            raise ValueError(
                f"model.quantization_fallback must be one of {QUANTIZATION_FALLBACKS}, "
                f"got {self.quantization_fallback!r}"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | "ModelConfig") -> "ModelConfig":
        """Build from a DictConfig or dict; nested blocks may be partial, missing ones take defaults."""
        if isinstance(cfg, ModelConfig):
            return cfg
        values = _to_plain(cfg)
        values.pop("train", None)
        nested = {
            "lora": LoraSettings,
            "series_encoder": SeriesEncoderSettings,
            "fusion": FusionSettings,
            "vocabulary": VocabularySettings,
        }
        kwargs = _check_keys(cls, values, "model")
        for name, settings in nested.items():
            if name in kwargs:
                kwargs[name] = settings(**_check_keys(settings, kwargs[name] or {}, f"model.{name}"))
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _to_plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A DictConfig becomes a resolved plain dict; anything else is copied as a dict."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return dict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: (_to_plain(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}


def _check_keys(settings: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    return dict(values)
