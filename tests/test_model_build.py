"""Building the hybrid model: configs, backbones, LoRA, finance vocabulary, series encoder, fusion."""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from fingpt_federated.conf import compose_config
from fingpt_federated.model.backbone import minilm_path
from fingpt_federated.model.build import build_model
from fingpt_federated.model.config import ModelConfig
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("tiny_setting")

TINY = {
    "max_length": 24,
    "series_encoder": {"d_model": 16, "layers": 1, "heads": 2},
    "fusion": {"d_model": 16, "heads": 2},
}


@cache
def _built(backbone: str, num_features: int = 3, **overrides):
    return build_model({**TINY, "backbone": backbone, **overrides}, 3, num_features)


def built(backbone: str, num_features: int = 3):
    model, tokenizer = _built(backbone, num_features)
    return copy.deepcopy(model), tokenizer


@pytest.mark.parametrize("name", ["minilm", "tiny_encoder", "tiny_decoder"])
def test_hydra_configs_compose_into_model_settings(name):
    cfg = compose_config([f"model={name}", "model.lora.r=4"]).model
    settings = ModelConfig.from_mapping(cfg)
    assert settings.lora.r == 4
    assert settings.backbone == name.replace("_", "-")
    assert TrainConfig.from_mapping(cfg.train) == TrainConfig(**cfg.train)  # the schema is TrainConfig, field for field


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match=r"model\.lora\.rank: Key 'rank' not in 'LoraSettings'"):
        ModelConfig.from_mapping({"lora": {"rank": 8}})
    with pytest.raises(ValueError, match="model.quantization must be one of"):
        ModelConfig.from_mapping({"quantization": "8bit"})


@pytest.mark.parametrize(
    ("backbone", "family", "targets"),
    [
        ("tiny-encoder", "encoder", {"query", "key", "value", "dense"}),
        ("tiny-decoder", "decoder", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ],
)
def test_family_is_detected_and_lora_targets_its_attention(backbone, family, targets):
    model, _ = built(backbone)
    assert model.family == family
    adapted = {name.split(".")[-2] for name in federated_state(model) if ".lora_B." in name}
    wrapped = {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name in federated_state(model) if ".lora_B." in name}
    assert adapted == {"default"} and wrapped == targets


def test_minilm_federated_state_is_small():
    model, _ = built("minilm", num_features=0)
    state = federated_state(model)
    lora = sum(t.numel() for n, t in state.items() if "lora_" in n)
    assert lora == 6 * 4 * (384 * 8 + 8 * 384)  # 6 layers x {query, key, value, output} x (A + B), r = 8
    wrapped = {name.split(".lora_")[0].split(".layer.")[1].split(".", 1)[1] for name in state if "lora_" in name}
    assert wrapped == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 22_000_000 and sum(t.numel() for t in state.values()) < 0.01 * frozen


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    rng_before = torch.get_rng_state()
    first = federated_state(_built("tiny-encoder")[0])
    again = federated_state(build_model({**TINY, "backbone": "tiny-encoder"}, 3, 3)[0])
    other_seed = federated_state(build_model({**TINY, "backbone": "tiny-encoder", "seed": 1}, 3, 3)[0])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other_seed[n]) for n in first)


def test_finance_terms_are_whole_tokens_initialised_from_their_pieces():
    model, tokenizer = built("minilm", num_features=0)
    plain_tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    plain_rows = AutoModel.from_pretrained(minilm_path()).get_input_embeddings().weight
    rows = model.backbone.get_input_embeddings().weight
    for term in ["EBITDA", "$JPM", "CVaR"]:
        (token_id,) = tokenizer(term, add_special_tokens=False)["input_ids"]
        pieces = plain_tokenizer(term, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1 and token_id >= len(plain_tokenizer)
        assert torch.allclose(rows[token_id], plain_rows[pieces].mean(0))
        assert not rows[token_id].requires_grad
    words = tokenizer.tokenize("EBITDA beat at $JPM, ebitdas missed")
    assert "ebitda" in words and "$jpm" in words and "##das" in words  # whole words only


def test_a_half_precision_checkpoint_is_loaded_in_float32(tmp_path):
    """Training and the fp32 published variant need fp32 weights whatever dtype the checkpoint has."""
    model, tokenizer = built("tiny-encoder", num_features=0)
    checkpoint = tmp_path / "bf16_backbone"
    model.backbone.get_base_model().to(torch.bfloat16).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(checkpoint)
    reloaded, _ = build_model({**TINY, "backbone": str(checkpoint)}, 3, 0)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}


def test_trainable_term_delta_is_an_embedding_in_the_federated_state():
    model, _ = build_model({**TINY, "backbone": "tiny-encoder", "vocabulary": {"trainable_delta": True}}, 3, 0)
    delta = federated_state(model)["term_delta.delta.weight"]
    assert delta.shape[0] > 50 and not delta.any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only applies without a GPU")
def test_4bit_quantization_is_refused_on_cpu_or_falls_back_as_configured():
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        build_model({**TINY, "backbone": "tiny-encoder", "quantization": "4bit"}, 3, 0)
    fallback = {**TINY, "backbone": "tiny-encoder", "quantization": "4bit", "quantization_fallback": "full_precision"}
    with pytest.warns(UserWarning, match="loading in full precision"):
        model, _ = build_model(fallback, 3, 0)
    assert model.backbone.get_input_embeddings().weight.dtype == torch.float32


def test_normaliser_tames_heavy_tails_and_ignores_padding():
    model, _ = built("tiny-encoder")
    rng = np.random.default_rng(0)
    series = rng.lognormal(8, 3, size=(64, 10, 3)).astype(np.float32) * rng.choice([-1, 1], size=(64, 10, 3))
    mask = np.arange(10)[None] < rng.integers(3, 11, size=64)[:, None]
    padded = series.copy()
    padded[~mask] = 1e30
    model.fit_normalizer(padded, mask)
    fitted_mean = model.series_encoder.normalizer.mean.clone()
    model.fit_normalizer(series, mask)
    assert torch.equal(model.series_encoder.normalizer.mean, fitted_mean)
    normalised = model.series_encoder.normalizer(torch.as_tensor(series)[torch.as_tensor(mask)])
    assert normalised.abs().max() <= 8.0 and abs(float(normalised.mean())) < 0.1


def test_series_encoder_is_causal_and_blind_to_padding():
    model, _ = built("tiny-encoder")
    model.eval()
    series = torch.randn(2, 8, 3)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    model.fit_normalizer(series, mask)
    base = model.series_encoder(series, mask)
    changed = series.clone()
    changed[:, 6] += 100.0  # the future of step 5, and padding of row 1
    after = model.series_encoder(changed, mask)
    assert torch.allclose(after[:, :6], base[:, :6], atol=1e-6)
    assert torch.equal(after[1, 5:], torch.zeros_like(after[1, 5:]))
    assert not torch.allclose(after[0, 6], base[0, 6])


def test_fusion_starts_as_identity_and_accepts_either_input():
    model, tokenizer = built("tiny-encoder")
    model.eval()
    text = tokenizer(["VaR rose", "CDS spreads tighten"], padding=True, return_tensors="pt")
    series, mask = torch.randn(2, 5, 3), torch.ones(2, 5, dtype=torch.bool)
    model.fit_normalizer(series, mask)
    text_only = model(text["input_ids"], text["attention_mask"])
    fused = model(text["input_ids"], text["attention_mask"], series, mask)
    assert torch.allclose(fused, text_only, atol=1e-6)  # gates are closed at initialisation
    assert model(series=series, series_mask=mask).shape == (2, 3)
    with torch.no_grad():
        for block in model.fusion.blocks:
            block.attn_gate.alpha.weight.fill_(1.0)
    assert not torch.allclose(model(text["input_ids"], text["attention_mask"], series, mask), text_only)
