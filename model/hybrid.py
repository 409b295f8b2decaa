"""The hybrid FinGPT: a frozen language backbone with LoRA, fused with a time-series encoder.

    text ──tokens──> backbone (+LoRA) ──token states──┐
                                                      ├─> gated cross-attention ─> pool ─> head
    series ──steps──> normaliser ─> causal encoder ───┤
    static features ──> feature tokens (model.features)┘

Inputs may be text only, series only, static features only, or any mix:
- text with a series and/or features: text tokens attend to the series states and the feature
  tokens together (model.fusion), then the text is pooled;
- text only: the backbone's pooled states go straight to the head;
- no text: the masked mean of the series states and feature tokens, projected to the text width,
  goes to the head.
A model built without `config.features` has no feature tensors at all (older checkpoints load).
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
from fingpt_federated.model.features import FeatureEncoder
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
        self.features: FeatureEncoder | None = None
        d_series = config.series_encoder.d_model
        if num_features > 0:
            self.series_encoder = SeriesEncoder(num_features, config.series_encoder)
        if config.features is not None:
            static = config.features
            self.features = FeatureEncoder(
                static.numeric, static.categorical, d_series, config.series_encoder.heads, config.feature_encoder
            )
        if num_features > 0 or self.features is not None:
            self.fusion = Fusion(d_text, d_series, config.fusion)
            self.series_proj = nn.Linear(d_series, d_text)
        self.head = nn.Sequential(nn.Dropout(config.head_dropout), nn.Linear(d_text, num_classes))

    @torch.no_grad()
    def shift_logits(self, shift: torch.Tensor) -> None:
        """Add `shift` (num_classes) to every logit the model outputs: to the head's output bias."""
        output = self.head[-1]
        assert isinstance(output, nn.Linear) and output.bias is not None
        if shift.shape != output.bias.shape:
            raise ValueError(f"a logit shift needs shape {tuple(output.bias.shape)}, got {tuple(shift.shape)}")
        output.bias.add_(shift.to(output.bias))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        series: torch.Tensor | None = None,
        series_mask: torch.Tensor | None = None,
        numeric: torch.Tensor | None = None,
        categorical: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits (B, num_classes) from token ids (B, L), a series (B, T, F) with mask (B, T) and/or
        static features: raw numbers (B, Fn) and category hashes (B, Fc)."""
        if input_ids is None and series is None and numeric is None and categorical is None:
            raise ValueError("the model needs text, a series or static features")
        series_states, series_mask = self._context(series, series_mask, numeric, categorical)
        if input_ids is None:
            # no text: the context was encoded above, by a model built with its series or feature parts
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

    def _context(
        self,
        series: torch.Tensor | None,
        series_mask: torch.Tensor | None,
        numeric: torch.Tensor | None,
        categorical: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the text attends to: series states then feature tokens (B, T + F, d), and their mask."""
        states, masks = [], []
        if series is not None:
            if self.series_encoder is None:
                raise ValueError("this model was built without a series encoder (num_features=0)")
            if series_mask is None:
                series_mask = torch.ones(series.shape[:2], dtype=torch.bool, device=series.device)
            states.append(self.series_encoder(series, series_mask))
            masks.append(series_mask)
        if numeric is not None or categorical is not None:
            if self.features is None:
                raise ValueError("this model was built without static features (model.features is null)")
            reference = numeric if numeric is not None else categorical
            assert reference is not None
            empty = reference.new_zeros((len(reference), 0))
            tokens = self.features(
                empty.float() if numeric is None else numeric, empty.long() if categorical is None else categorical
            )
            states.append(tokens)
            masks.append(torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
        if not states:
            return None, None
        return torch.cat(states, dim=1), torch.cat(masks, dim=1)

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

    def fit_features(self, numeric: np.ndarray, categorical: np.ndarray) -> None:
        """Fit the static features' statistics and vocabulary on this bank's training rows (only)."""
        if self.features is None:
            raise ValueError("this model has no static features (model.features is null)")
        self.features.fit(numeric, categorical)

    @property
    def normalizer_fitted(self) -> bool:
        return self.series_encoder is None or bool(self.series_encoder.normalizer.fitted)

    @property
    def features_fitted(self) -> bool:
        return self.features is None or bool(self.features.fitted)

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
