"""Texts longer than model.max_length (model/text_length.py): one warning per data set with the count
and the longest length, and `max_length: auto` covering 99% of the training texts, on a templated
credit table (synthetic credit records, a long template)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from fingpt_federated.conf import compose_config
from fingpt_federated.data.batching import EncodedBank
from fingpt_federated.data.federation_layout import TRAINING_TEXTS, layout_texts, prepare_federation
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.data.synthetic import generate_credit
from fingpt_federated.model.build import build_model
from fingpt_federated.model.text_length import covering_length, resolve_max_length, with_max_length

pytestmark = pytest.mark.usefixtures("tiny_setting")

TEMPLATE = (
    "A {age}-year-old {sex} applicant, {marital}, education: {education}, credit limit {credit_limit}. "
    "Repayment status over six months: {status_1}, {status_2}, {status_3}, {status_4}, {status_5}, {status_6}. "
    "Bills: {bill_1:.0f}, {bill_2:.0f}, {bill_3:.0f}, {bill_4:.0f}, {bill_5:.0f}, {bill_6:.0f} NT dollars."
)
TINY = {"backbone": "tiny-encoder", "max_length": 64}


@pytest.fixture
def credit(tmp_path):
    path = tmp_path / "credit.csv"
    generate_credit(2, 100, seed=0).to_csv(path, index=False)
    cfg = {
        "files": {"train": str(path)},
        "text": {"template": TEMPLATE},
        "label": {"column": "default", "classes": {0: "repaid", 1: "default"}},
        "keep_columns": ["bank"],
    }
    return path, cfg


def tokenizer_lengths(texts):
    _, tokenizer = build_model(TINY, 2, 0)  # the run's tokenizer: finance vocabulary included
    return tokenizer, np.array([len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]])


def test_long_templated_texts_warn_once_with_the_count_and_the_longest(credit, caplog):
    _, cfg = credit
    texts = load_dataset(cfg).texts
    tokenizer, lengths = tokenizer_lengths(texts)
    cut = int((lengths > 64).sum())
    assert 0 < cut < len(texts)  # the template makes most, not all, texts longer than 64 tokens
    with caplog.at_level(logging.WARNING):
        assert resolve_max_length(TINY, {"train texts": texts, "short": ["up"]}, "train texts") == 64
    assert [r.getMessage() for r in caplog.records] == [
        f"train texts: {cut} of {len(texts)} texts are longer than model.max_length=64 tokens "
        f"(longest {lengths.max()}); their tails are cut: raise model.max_length or set it to auto"
    ]
    encoded = EncodedBank(load_dataset(cfg), tokenizer, 64).token_ids  # what training actually cuts
    assert sum(len(ids) == 64 for ids in encoded) >= cut and all(len(ids) <= 64 for ids in encoded)


def test_auto_picks_the_length_covering_99_percent_of_the_training_texts(credit, caplog):
    _, cfg = credit
    texts = load_dataset(cfg).texts
    _, lengths = tokenizer_lengths(texts)
    expected = int(np.sort(lengths)[math.ceil(0.99 * len(lengths)) - 1])
    with caplog.at_level(logging.WARNING):
        resolved = resolve_max_length({**TINY, "max_length": "auto"}, {"train texts": texts}, "train texts")
    assert resolved == expected and (lengths <= resolved).mean() >= 0.99 and (lengths < resolved).mean() < 0.99
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith(f"model.max_length: auto = {expected} tokens, covering ")
    assert f"of the {len(texts)} training texts (longest {lengths.max()}, backbone limit 512)" in messages[0]
    cut = int((lengths > expected).sum())
    assert messages[1:] == ([] if not cut else [messages[1]]) and (not cut or f": {cut} of " in messages[1])


def test_auto_is_capped_at_the_backbone_limit():
    assert covering_length(np.array([10] * 50 + [900] * 50), limit=512) == 512
    assert covering_length(np.array(list(range(1, 101))), limit=512) == 99


def test_auto_is_resolved_into_the_run_config_of_a_federation(credit, tmp_path):
    path, _ = credit
    overrides = [
        "data=synthetic_credit",
        "data.synthetic=null",
        f"data.files.train={path}",
        f"data.text.template='{TEMPLATE}'",
        "model=tiny_encoder",
        "model.max_length=auto",
        "federation.min_size=2",
    ]
    cfg = compose_config(overrides)
    layout = prepare_federation(cfg, tmp_path / "fed")
    texts = layout_texts(layout)
    resolved = with_max_length(cfg, texts, TRAINING_TEXTS)
    _, lengths = tokenizer_lengths(texts[TRAINING_TEXTS])
    assert resolved.model.max_length == covering_length(lengths, 512) and cfg.model.max_length == "auto"
    assert f"max_length: {resolved.model.max_length}\n" in OmegaConf.to_yaml(resolved.model)


def test_a_max_length_that_is_neither_a_number_nor_auto_is_refused():
    with pytest.raises(ValueError, match="model.max_length must be a number of tokens or 'auto', got 'long'"):
        compose_config(["model.max_length=long"])


def test_an_unresolved_auto_is_refused_where_a_model_is_built():
    with pytest.raises(ValueError, match="model.max_length=auto is resolved by fingpt-sim and bench_centralized"):
        build_model({**TINY, "max_length": "auto"}, 2, 0)
