"""Static numeric and categorical features: read and checked from a table, encoded as tokens, learned from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from pydantic import ValidationError

from fingpt_federated.client.training import reached_parameters, train_local
from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.data.config import data_config
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.loading import table_to_dataset
from fingpt_federated.data.storage import load_records, save_records
from fingpt_federated.infer.inputs import check_record, records_to_dataset
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.infer.schemas import PredictRequest
from fingpt_federated.model.build import build_model
from fingpt_federated.model.evaluation import evaluate
from fingpt_federated.model.merge import merge_lora
from fingpt_federated.model.published import load_published, write_published
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.dp_budget import PrivacyLedger, ledger_path
from fingpt_federated.privacy.dp_settings import DPSettings
from fingpt_federated.privacy.dp_training import DPTask
from fingpt_federated.privacy.he_context import HEParams, new_context
from fingpt_federated.privacy.he_packing import decrypt_mean, encrypt_update, schema_of

pytestmark = pytest.mark.usefixtures("tiny_setting")

FEATURES = {"numeric": ["amount", "age", "noise"], "categorical": ["purpose", "housing"]}
DATA = {"name": "credit_features", "label": {"column": "default", "classes": {0: "repaid", 1: "default"}}}
TINY = {
    "backbone": "tiny-encoder",
    "head_dropout": 0.0,
    "series_encoder": {"d_model": 32, "layers": 1, "heads": 2},
    "fusion": {"d_model": 32, "heads": 2},
    "feature_encoder": {"dropout": 0.0},
}
FAST = TrainConfig(lr=1e-2, batch_size=32, epochs=8, patience=None, progress=False)


def credit_table(n: int, seed: int) -> pd.DataFrame:
    """Default depends on the amount (heavy-tailed) and the purpose; age, noise and housing carry nothing."""
    rng = np.random.default_rng(seed)
    amount = np.exp(rng.normal(8, 1.2, n))
    purpose = rng.choice(["car", "education", "business", "repairs"], n)
    risk = (np.log(amount) - 8) * 2.0 + np.where(purpose == "business", 1.5, -0.5)
    default = (risk + rng.normal(0, 0.5, n) > 0).astype(int)
    table = pd.DataFrame(
        {
            "amount": amount.round(2),
            "age": rng.integers(20, 70, n),
            "noise": rng.normal(0, 1, n),
            "purpose": purpose,
            "housing": rng.choice(["own", "rent", "free"], n),
            "default": default,
        }
    )
    return table.assign(_source="credit.csv", _row=np.arange(1, n + 1))


def dataset(table: pd.DataFrame, features: dict | None = None):
    return table_to_dataset(table, {**DATA, "features": features or FEATURES})


def model_with_features(features: dict | None = None):
    return build_model({**TINY, "features": features or FEATURES}, 2, 0)


def test_features_read_raw_with_stable_category_hashes() -> None:
    data = dataset(credit_table(40, 0))
    assert data.texts is None and data.series is None
    assert data.features is not None and data.features.names == ["amount", "age", "noise", "purpose", "housing"]
    assert data.features.numeric.shape == (40, 3) and data.features.categorical.shape == (40, 2)
    again = dataset(credit_table(40, 0).iloc[::-1].reset_index(drop=True))
    assert set(again.features.categorical[:, 0]) == set(data.features.categorical[:, 0])  # same value, same hash


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("amount", "lots", "value 'lots' is not a finite number"),
        ("amount", "inf", "is not a finite number"),
        ("amount", "1e40", "out of range"),
        ("purpose", "", "empty value"),
    ],
)
def test_a_bad_feature_cell_is_a_one_line_error_at_its_row(column: str, cell: str, message: str) -> None:
    table = credit_table(20, 1).astype({column: object})
    table.loc[6, column] = cell
    with pytest.raises(DataError, match=message) as caught:
        dataset(table)
    assert str(caught.value).startswith(f"credit.csv, row 7, column '{column}': ")


def test_unknown_keys_and_missing_columns_are_refused() -> None:
    with pytest.raises(ValueError, match="features.bins"):
        data_config({**DATA, "features": {"numeric": ["amount"], "bins": 3}})
    with pytest.raises(DataError, match="missing features column"):
        dataset(credit_table(10, 0), {"numeric": ["amount", "salary"]})
    with pytest.raises(ValueError, match="more than once"):
        dataset(credit_table(10, 0), {"numeric": ["amount"], "categorical": ["amount"]})


def test_saved_bank_keeps_its_features(tmp_path) -> None:
    data = dataset(credit_table(30, 2))
    loaded = load_records(save_records(data, tmp_path / "bank"))
    assert loaded.features is not None and loaded.features.names == data.features.names
    np.testing.assert_array_equal(loaded.features.categorical, data.features.categorical)
    np.testing.assert_allclose(loaded.features.numeric, data.features.numeric)


def test_no_features_configured_means_no_new_tensors() -> None:
    plain, _ = build_model({**TINY}, 2, 3)
    featured, _ = model_with_features()
    assert plain.features is None
    assert not any(name.startswith("features.") for name in plain.state_dict())
    new = set(federated_state(featured)) - set(federated_state(plain))
    assert new and all(name.startswith("features.") for name in new)


def test_the_model_learns_from_features_and_unseen_categories_do_not_crash() -> None:
    train, test = dataset(credit_table(600, 3)), dataset(credit_table(300, 4))
    model, tokenizer = model_with_features()
    result = train_local(model, tokenizer, train, FAST)
    assert result.steps > 0 and model.features_fitted
    metrics = evaluate(model, tokenizer, test, 128)
    assert metrics["roc_auc"] > 0.9, metrics
    unseen = credit_table(20, 5).assign(purpose="holiday", housing="boat")
    logits = model(**_inputs(dataset(unseen)))
    assert torch.isfinite(logits).all()


def test_dp_training_on_features_alone_steps_the_feature_encoder_and_learns(tmp_path) -> None:
    """DP-SGD steps only the parameters the data reaches: with features and no text nor series those are the
    feature encoder, series_proj and the head (before the probe fed features, none was found and no bank trained)."""
    train, test = dataset(credit_table(600, 3)), dataset(credit_table(300, 4))
    model, tokenizer = model_with_features()
    before = federated_state(model)
    dp = DPSettings(
        enabled=True, accountant="rdp", logical_batch_size=64, physical_batch_size=64, lr=1e-2, planned_rounds=1
    )
    ledger = PrivacyLedger.open(
        ledger_path(tmp_path, "run"), run="run", accountant="rdp", delta=dp.delta, target_epsilon=dp.target_epsilon
    )
    result = train_local(model, tokenizer, train, FAST, privacy=DPTask(dp, ledger, "1", seed=0))
    after = federated_state(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == set(reached_parameters(model, train))
    assert any(name.startswith("features.") for name in moved) and "head.1.weight" in moved
    assert not any(name.startswith(("fusion.", "series_encoder.")) for name in moved)
    assert result.epsilon is not None and result.epsilon <= 8.0
    assert evaluate(model, tokenizer, test, 128)["roc_auc"] > 0.8


def test_vocabulary_slots_are_the_same_in_every_bank() -> None:
    one, _ = model_with_features()
    two, _ = model_with_features()
    table = credit_table(200, 6)
    rows_a, rows_b = dataset(table[table.housing == "own"]), dataset(table[table.housing != "own"])
    one.fit_features(rows_a.features.numeric, rows_a.features.categorical)
    two.fit_features(rows_b.features.numeric, rows_b.features.categorical)
    purpose = 0  # categorical feature 0: every purpose appears in both halves
    assert torch.equal(one.features.vocabulary[purpose], two.features.vocabulary[purpose])


def _inputs(data) -> dict[str, torch.Tensor]:
    return {
        "numeric": torch.tensor(data.features.numeric),
        "categorical": torch.tensor(data.features.categorical),
    }


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_setting):
    """A features-only model trained on the credit table, published and loaded back as fingpt-infer loads it."""
    train = dataset(credit_table(600, 3))
    model, tokenizer = model_with_features()
    train_local(model, tokenizer, train, FAST)
    folder = tmp_path_factory.mktemp("published") / "model"
    info = {"class_names": train.class_names, "feature_names": [], "data": {**DATA, "features": FEATURES}}
    write_published(merge_lora(model).eval(), tokenizer, folder, ["fp32"], info)
    return load_published(folder)


def test_published_model_keeps_statistics_and_vocabulary_and_explains_per_feature(published) -> None:
    model = published.model
    assert model.features is not None and model.features_fitted
    assert int((model.features.vocabulary[0] != 0).sum()) == 4  # the four purposes of the training rows
    records = [
        {"features": {"amount": 50000.0, "age": 40, "noise": 0.1, "purpose": "business", "housing": "own"}},
        {"features": {"amount": 300.0, "age": 40, "noise": 0.1, "purpose": "holiday", "housing": "boat"}},
    ]
    for record in records:
        check_record(record, published.manifest)
    predictions = Predictor(published).predict(records_to_dataset(records, published.manifest))
    assert [p.label for p in predictions] == ["default", "repaid"]
    assert all(
        {item["feature"] for item in p.explanation["features"]} <= set(model.features.names) for p in predictions
    )
    many = dataset(credit_table(200, 7))
    shares: dict[str, float] = {}
    for prediction in Predictor(published).predict(many):
        for item in prediction.explanation["features"]:
            shares[item["feature"]] = shares.get(item["feature"], 0.0) + abs(item["score"])
    ranked = sorted(shares, key=shares.get, reverse=True)
    assert set(ranked[:2]) == {"amount", "purpose"}, shares  # the two the label depends on


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"amount": 1.0, "age": 3, "noise": 0.0, "purpose": "car"}, r"lacks \['housing'\]"),
        ({"amount": 1e39, "age": 3, "noise": 0.0, "purpose": "car", "housing": "own"}, "'features.amount' is not a"),
        ({"amount": "x", "age": 3, "noise": 0.0, "purpose": "car", "housing": "own"}, "'features.amount' is not a"),
        (None, "this model reads static features"),
    ],
)
def test_a_malformed_request_feature_is_named(published, features, message) -> None:
    record = {} if features is None else {"features": features}
    with pytest.raises(ValueError, match=message):
        check_record(record, published.manifest)


def test_a_nan_feature_in_a_request_body_is_refused_by_the_schema() -> None:
    with pytest.raises(ValidationError) as caught:
        PredictRequest.model_validate_json('{"features": {"amount": NaN, "purpose": "car"}}')
    assert "features.amount" in str(caught.value)


def test_feature_tensors_travel_through_he_packing() -> None:
    """The federated state gains the feature encoder's tensors; CKKS packing carries them like any other."""
    params = HEParams.from_config(
        {**OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "privacy" / "he.yaml").he), "scheme": "ckks"}
    )
    model, _ = model_with_features()
    state = {name: value * 0.01 for name, value in federated_state(model).items() if not name.startswith("backbone")}
    assert any(name.startswith("features.category") for name in state)
    he = new_context(params)
    mean = decrypt_mean(encrypt_update(state, 1.0, he), he, schema_of(state), dtype=np.float64)
    assert max(float(np.max(np.abs(mean[name] - value.numpy()))) for name, value in state.items()) < 1e-5
