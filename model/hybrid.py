"""The hybrid FinGPT: a frozen language backbone with LoRA, fused with a time-series encoder.

    text ──tokens──> backbone (+LoRA) ──token states──┐
                                                      ├─> gated cross-attention ─> pool ─> head
    series ──steps──> normaliser ─> causal encoder ───┘

Inputs may be text only, series only, or both:
- both: text tokens attend to the series (model.fusion), then the text is pooled;
- text only: the backbone's pooled states go straight to the head;
- series only: the masked mean of the series states, projected to the text width, goes to the head.
Pooling follows the backbone family: mean over tokens for encoders (what MiniLM was trained
for), the last real token for causal decoders (the only one that has seen the whole text).

Trainable, and federated: LoRA adapters, the optional finance-term offsets, the series encoder,
the fusion and the head. The backbone's own weights are frozen; the normaliser's statistics are
buffers that each bank fits on its own training data.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel

from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.fusion import Fusion
from fingpt_federated.model.series import SeriesEncoder
from fingpt_federated.model.vocabulary import TermEmbeddingDelta


class HybridFinGPT(nn.Module):
    def __init__(
        self,
        backbone: PreTrainedModel | PeftModel,
        family: str,
        config: ModelConfig,
        num_classes: int,
        num_features: int,
        term_ids: list[int],
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config = config
        self.family = family
        self.num_classes = num_classes
        self.num_features = num_features
        self.backbone = backbone
        d_text = backbone.config.hidden_size
        self.term_delta: TermEmbeddingDelta | None = (
            TermEmbeddingDelta(term_ids[0], len(term_ids), d_text)
            if config.vocabulary.trainable_delta and term_ids
            else None
        )
        self.series_encoder: SeriesEncoder | None = None
        self.fusion: Fusion | None = None
        self.series_proj: nn.Linear | None = None
        if num_features > 0:
            d_series = config.series_encoder.d_model
            self.series_encoder = SeriesEncoder(num_features, config.series_encoder)
            self.fusion = Fusion(d_text, d_series, config.fusion)
            self.series_proj = nn.Linear(d_series, d_text)
        self.head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(d_text, num_classes))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        series: torch.Tensor | None = None,
        series_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits (B, num_classes) from token ids (B, L) and/or a series (B, T, F) with mask (B, T)."""
        if input_ids is None and series is None:
            raise ValueError("the model needs text, a series, or both")
        series_states = None
        if series is not None:
            if self.series_encoder is None:
                raise ValueError("this model was built without a series encoder (num_features=0)")
            if series_mask is None:
                series_mask = torch.ones(series.shape[:2], dtype=torch.bool, device=series.device)
            series_states = self.series_encoder(series, series_mask)
        if input_ids is None:
            # series only: encoded above, by a model that was built with its series parts
            assert self.series_proj is not None and series_states is not None and series_mask is not None
            pooled = self.series_proj(_masked_mean(series_states, series_mask))
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            text = self._encode_text(input_ids, attention_mask)
            if series_states is not None:
                assert self.fusion is not None  # built with the series encoder that made series_states
                text = self.fusion(text, series_states, series_mask)
            pooled = self._pool_text(text, attention_mask.bool())
        return self.head(pooled)

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor | bool] = {"attention_mask": attention_mask}
        if self.family == "decoder":
            kwargs["use_cache"] = False
        if self.term_delta is None:
            out = self.backbone(input_ids=input_ids, **kwargs)
        else:
            embeds = self.backbone.get_input_embeddings()(input_ids)
            out = self.backbone(inputs_embeds=embeds + self.term_delta(input_ids).to(embeds.dtype), **kwargs)
        return out.last_hidden_state.float()

    def _pool_text(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.family == "decoder":
            last = mask.sum(dim=1).clamp_min(1) - 1
            return states[torch.arange(len(states), device=states.device), last]
        return _masked_mean(states, mask)

    def fit_normalizer(self, series: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> None:
        """Fit the series statistics on this bank's training data (only; never on evaluation data)."""
        if self.series_encoder is None:
            raise ValueError("this model has no series encoder (num_features=0)")
        self.series_encoder.normalizer.fit(series, mask)

    @property
    def normalizer_fitted(self) -> bool:
        return self.series_encoder is None or bool(self.series_encoder.normalizer.fitted)

    def own_state(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a frozen backbone weight: what `save_model` writes."""
        return {
            name: tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith("backbone.") or "lora_" in name
        }


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
