"""Typed model settings: the schema of the Hydra `model:` group and the only copy of its defaults.

conf/schema.py registers `ModelConfig` (with the `train:` block of `model.train_config`) as the
group's schema, so conf/model/*.yaml only set what differs from these defaults, and a wrong key
or type fails when the config is composed. `from_mapping` builds the same settings from a plain
dict (a published manifest, a round's settings), with the same checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from fingpt_federated.data.features import Features
from fingpt_federated.structured_config import build

QUANTIZATIONS = ("none", "4bit")
QUANTIZATION_FALLBACKS = ("error", "full_precision")
FAMILIES = ("encoder", "decoder")


@dataclass
class LoraSettings:
    """LoRA on the frozen backbone. `target_modules=None` picks the family default."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the 4 attention projections (BERT: query, key, value,
    #                                          attention.output.dense; decoders: q/k/v/o_proj)
    freeze_lora_a: bool = False  # FFA-LoRA: A fixed from the seed, only B trained and averaged


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
    d_model: int = 128  # inner width of the cross-attention and of the gated MLP
    layers: int = 1
    dropout: float = 0.1


@dataclass
class FeatureEncoderSettings:
    """Static features as tokens (model/features.py); the width is `series_encoder.d_model`.

    `slots`: vocabulary entries per categorical feature (a value hashing to a taken entry is "unknown").
    """

    slots: int = 128
    layers: int = 1
    dropout: float = 0.1


@dataclass
class VocabularySettings:
    """Finance terms as whole tokens; `trainable_delta` adds a learned offset per term."""

    enabled: bool = True  # finance terms and cashtags as whole tokens
    trainable_delta: bool = False  # a learned (federated) offset for those tokens


@dataclass
class ModelConfig:
    """The hybrid model: backbone, LoRA, series encoder, fusion, head (conf/model/minilm.yaml is these defaults).

    `backbone`: minilm | tiny-encoder | tiny-decoder | a local checkpoint folder; `family`: encoder |
    decoder, None = detected from the backbone's config; `max_length`: tokens per text; `seed`: every
    bank building this config gets the same initial weights; `quantization`: none | 4bit (bitsandbytes
    NF4, QLoRA style, CUDA only), with `quantization_fallback` (error | full_precision) without a GPU.
    """

    backbone: str = "minilm"
    family: str | None = None
    max_length: Any = 64  # a number of tokens, or "auto": covers 99% of the training texts (model/text_length.py)
    head_dropout: float = 0.1
    seed: int = 0
    quantization: str = "none"
    quantization_fallback: str = "error"
    lora: LoraSettings = field(default_factory=LoraSettings)
    series_encoder: SeriesEncoderSettings = field(default_factory=SeriesEncoderSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    vocabulary: VocabularySettings = field(default_factory=VocabularySettings)
    # the data's static features, {numeric: [...], categorical: [...]} (conf/config.yaml: ${data.features});
    # None: none. Typed Any so that the interpolation is resolved once the data group is in; checked below.
    features: Any = None
    feature_encoder: FeatureEncoderSettings = field(default_factory=FeatureEncoderSettings)

    def __post_init__(self) -> None:
        if self.max_length != "auto" and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"model.max_length must be a number of tokens or 'auto', got {self.max_length!r}")
        if self.features is not None and not isinstance(self.features, Features):
            try:
                self.features = Features(**dict(self.features))
            except TypeError as error:
                raise ValueError(f"model.features: {error}") from None
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
    def from_mapping(cls, cfg: Mapping[str, Any] | ModelConfig) -> ModelConfig:
        """Build from a DictConfig or dict over the defaults; the `train:` block is not read here."""
        if isinstance(cfg, ModelConfig):
            return cfg
        plain = cfg
        if isinstance(cfg, DictConfig):
            plain = cast(Mapping[str, Any], OmegaConf.to_container(cfg, resolve=True))
        return build(cls, {key: value for key, value in plain.items() if key != "train"}, "model")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
