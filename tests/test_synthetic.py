"""Tests of the synthetic bank federation generator (data/synthetic.py)."""

from __future__ import annotations

import time
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fingpt_federated.data.synthetic import (
    CASH_DESK_BASE,
    FOREIGN_BASE,
    HORIZON_STEPS,
    PROFILES,
    bank_sizes,
    generate_credit,
    generate_news,
    generate_transactions,
    write_federation,
)

SEED = 11
NUM_BANKS = len(PROFILES)  # one bank of every profile


@pytest.fixture(scope="module")
def news() -> pd.DataFrame:
    return generate_news(NUM_BANKS, 400, SEED)


@pytest.fixture(scope="module")
def credit() -> pd.DataFrame:
    return generate_credit(NUM_BANKS, 400, SEED)


@pytest.fixture(scope="module")
def transactions() -> tuple[pd.DataFrame, pd.DataFrame]:
    return generate_transactions(NUM_BANKS, 300, SEED)


def _generate(task: str, num_banks: int, rows: int, seed: int) -> list[pd.DataFrame]:
    """The frames of ``task``, in the order write_federation writes them."""
    if task == "transactions":
        return list(generate_transactions(num_banks, rows, seed))
    generate = generate_news if task == "news" else generate_credit
    return [generate(num_banks, rows, seed)]


def _max_label_distance(frame: pd.DataFrame, label: str) -> float:
    """Largest total-variation distance between two banks' label distributions."""
    shares = pd.crosstab(frame["bank"], frame[label], normalize="index")
    return max(0.5 * np.abs(shares.loc[a] - shares.loc[b]).sum() for a, b in combinations(shares.index, 2))


def _split_auc(features: np.ndarray, labels: pd.Series) -> float:
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0, stratify=labels
    )
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x_train, y_train)
    return roc_auc_score(y_test, model.predict_proba(x_test)[:, 1])


def _account_features(accounts: pd.DataFrame, transfers: pd.DataFrame) -> pd.DataFrame:
    near_threshold = transfers["amount"].between(9000, 10000, inclusive="left")
    incoming = (
        transfers.assign(near=near_threshold)
        .groupby("target")
        .agg(
            n_in=("amount", "size"),
            fan_in=("source", "nunique"),
            near=("near", "sum"),
            cross_in=("cross_border", "sum"),
        )
    )
    outgoing = transfers.groupby("source").agg(n_out=("amount", "size"), cross_out=("cross_border", "sum"))
    features = accounts.set_index("account_id").join(incoming).join(outgoing).fillna(0)
    total = features["n_in"] + features["n_out"]
    features["cross_share"] = (features["cross_in"] + features["cross_out"]) / total
    return features


def _has_cycle(edges: set[tuple[int, int]], max_length: int = 4) -> bool:
    """Whether some directed cycle of 2 to ``max_length`` hops exists among ``edges``."""
    successors: dict[int, set[int]] = {}
    for source, target in edges:
        successors.setdefault(source, set()).add(target)
    for start in successors:
        frontier = successors[start]
        for _ in range(max_length - 1):
            frontier = {nxt for node in frontier for nxt in successors.get(node, ())}
            if start in frontier:
                return True
    return False


@pytest.mark.parametrize("task", ["news", "credit", "transactions"])
def test_same_seed_same_frames_other_seed_other_frames(task: str) -> None:
    first, again, other = (_generate(task, 3, 50, seed) for seed in (3, 3, 4))
    for a, b in zip(first, again, strict=True):
        pd.testing.assert_frame_equal(a, b)
    assert not all(a.equals(c) for a, c in zip(first, other, strict=True))


def test_generation_leaves_global_rng_alone() -> None:
    np.random.seed(0)
    expected = np.random.random()
    np.random.seed(0)
    generate_news(2, 20, 1)
    generate_transactions(2, 20, 1)
    assert np.random.random() == expected


@pytest.mark.parametrize("task", ["news", "credit", "transactions"])
def test_written_files_are_byte_identical_for_same_seed(task: str, tmp_path) -> None:
    first = write_federation(task, tmp_path / "a", 3, 60, 5)
    second = write_federation(task, tmp_path / "b", 3, 60, 5)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes()


def test_bank_names_and_quantity_skew(news: pd.DataFrame) -> None:
    names = list(news["bank"].unique())
    assert names == [f"bank_{i:02d}_{profile.name}" for i, profile in enumerate(PROFILES)]
    sizes = news["bank"].value_counts()
    assert sizes.max() / sizes.min() > 2.5
    assert abs(sizes.mean() - 400) < 10


def test_profiles_cycle_when_more_banks_than_profiles() -> None:
    banks = generate_news(NUM_BANKS + 2, 5, 0)["bank"].unique()
    assert banks[NUM_BANKS] == f"bank_{NUM_BANKS:02d}_{PROFILES[0].name}"
    assert len(banks) == NUM_BANKS + 2
    assert min(bank_sizes(NUM_BANKS + 2, 1)) == 1


def test_news_schema_and_variety(news: pd.DataFrame) -> None:
    assert list(news.columns) == ["text", "sentiment", "bank"]
    assert pd.api.types.is_string_dtype(news["text"])
    assert set(news["sentiment"]) == {"bearish", "bullish", "neutral"}
    assert news["text"].nunique() > 0.9 * len(news)
    corpus = " ".join(news["text"])
    for term in (
        "$JPM",
        "basis points",
        "VaR",
        "Tier 1 capital",
        "NPL ratio",
        "CDS spreads",
        "EPS",
        "guidance",
        "downgrade",
        "yield curve",
        "did not",
        "whether",
    ):
        assert term in corpus, term


def test_news_labels_differ_between_banks(news: pd.DataFrame) -> None:
    assert _max_label_distance(news, "sentiment") > 0.2


def test_news_is_learnable_but_not_trivial(news: pd.DataFrame) -> None:
    train, test = train_test_split(news, test_size=0.3, random_state=0)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    model = LogisticRegression(max_iter=1000)
    model.fit(vectorizer.fit_transform(train["text"]), train["sentiment"])
    accuracy = (model.predict(vectorizer.transform(test["text"])) == test["sentiment"]).mean()
    majority = test["sentiment"].value_counts(normalize=True).max()
    assert majority + 0.15 < accuracy < 0.99


def test_credit_schema(credit: pd.DataFrame) -> None:
    months = range(1, 7)
    expected = (
        ["bank", "age", "sex", "education", "marital", "credit_limit"]
        + [f"status_{m}" for m in months]
        + [f"bill_{m}" for m in months]
        + [f"paid_{m}" for m in months]
        + ["default"]
    )
    assert list(credit.columns) == expected
    ints = ["age", "credit_limit", "default"] + [f"status_{m}" for m in months]
    assert all(pd.api.types.is_integer_dtype(credit[c]) for c in ints)
    assert set(credit["sex"]) == {"female", "male"}
    assert set(credit["education"]) == {"graduate", "university", "high_school", "other"}
    assert set(credit["marital"]) == {"married", "single", "other"}
    assert set(credit["default"]) == {0, 1}
    statuses = credit[[f"status_{m}" for m in months]].to_numpy()
    assert statuses.min() >= -2 and statuses.max() <= 8
    bills = credit[[f"bill_{m}" for m in months]].to_numpy()
    paid = credit[[f"paid_{m}" for m in months]].to_numpy()
    assert (bills >= 0).all() and (paid >= 0).all() and (paid <= bills + 0.01).all()


def test_credit_default_rates_differ_between_banks(credit: pd.DataFrame) -> None:
    assert _max_label_distance(credit, "default") > 0.2


def test_credit_is_learnable_but_not_trivial(credit: pd.DataFrame) -> None:
    status = credit[[f"status_{m}" for m in range(1, 7)]].to_numpy()
    bills = credit[[f"bill_{m}" for m in range(1, 7)]].to_numpy()
    paid = credit[[f"paid_{m}" for m in range(1, 7)]].to_numpy()
    features = np.column_stack([status.mean(axis=1), status.max(axis=1), (paid / (bills + 1.0)).mean(axis=1)])
    assert 0.65 < _split_auc(features, credit["default"]) < 0.97


def test_transactions_schema(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accounts, transfers = transactions
    assert list(accounts.columns) == ["account_id", "bank", "account_type", "opening_balance", "laundering"]
    assert list(transfers.columns) == ["source", "target", "amount", "step", "cross_border"]
    assert accounts["account_id"].is_unique
    assert set(accounts["account_type"]) == {"personal", "business"}
    assert set(accounts["laundering"]) == {0, 1}
    for column in ("source", "target", "step", "cross_border"):
        assert pd.api.types.is_integer_dtype(transfers[column]), column
    assert (transfers["amount"] > 0).all()
    assert (transfers["amount"].round(2) == transfers["amount"]).all()
    assert transfers["step"].is_monotonic_increasing
    assert transfers["step"].between(0, HORIZON_STEPS - 1).all()


def test_cross_border_means_a_foreign_party(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    _, transfers = transactions
    foreign = (transfers["source"] >= FOREIGN_BASE) | (transfers["target"] >= FOREIGN_BASE)
    assert (transfers["cross_border"] == foreign.astype(int)).all()


def test_every_account_has_a_transfer(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accounts, transfers = transactions
    seen = set(transfers["source"]) | set(transfers["target"])
    assert set(accounts["account_id"]) <= seen


@pytest.mark.parametrize("accounts_per_bank", [25, 300])
def test_laundering_in_every_bank_of_twenty_accounts(accounts_per_bank: int) -> None:
    accounts, _ = generate_transactions(NUM_BANKS, accounts_per_bank, 2)
    per_bank = accounts.groupby("bank")["laundering"].agg(["size", "sum"])
    assert (per_bank["size"] >= 20).sum() >= NUM_BANKS - 1
    assert (per_bank.loc[per_bank["size"] >= 20, "sum"] > 0).all()


def test_laundering_rates_differ_between_banks(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    rates = transactions[0].groupby("bank")["laundering"].mean()
    assert rates.max() - rates.min() > 0.05


def test_laundering_typologies_are_present(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    accounts, transfers = transactions
    launderers = set(accounts.loc[accounts["laundering"] == 1, "account_id"])
    structured = transfers[
        (transfers["source"] >= CASH_DESK_BASE)
        & (transfers["source"] < CASH_DESK_BASE + NUM_BANKS)
        & transfers["amount"].between(9000, 10000, inclusive="left")
    ]
    deposits = structured.groupby("target").size()
    assert (deposits[deposits.index.isin(launderers)] >= 3).any()
    among = transfers[transfers["source"].isin(launderers) & transfers["target"].isin(launderers)]
    assert _has_cycle(set(zip(among["source"], among["target"], strict=True)))


def test_transactions_are_learnable_but_not_trivial(transactions: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    features = _account_features(*transactions)
    columns = ["n_in", "n_out", "fan_in", "near", "cross_share"]
    assert 0.65 < _split_auc(features[columns].to_numpy(), features["laundering"]) < 0.98


@pytest.mark.parametrize("task", ["news", "credit", "transactions"])
def test_write_federation_round_trips(task: str, tmp_path) -> None:
    paths = write_federation(task, tmp_path / "out", 2, 30, 9)
    expected = _generate(task, 2, 30, 9)
    assert list(paths) == (["train", "series"] if task == "transactions" else ["train"])
    for path, frame in zip(paths.values(), expected, strict=True):
        pd.testing.assert_frame_equal(pd.read_csv(path), frame)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "prices"}, "news, credit, transactions"),
        ({"num_banks": 0}, "num_banks"),
        ({"rows_per_bank": 0}, "rows"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str, tmp_path) -> None:
    arguments = {"task": "news", "out_dir": tmp_path, "num_banks": 2, "rows_per_bank": 5, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        write_federation(**arguments)


@pytest.mark.parametrize("generate", [generate_news, generate_credit, generate_transactions])
def test_generators_reject_bad_sizes(generate) -> None:
    with pytest.raises(ValueError):
        generate(0, 10, 0)
    with pytest.raises(ValueError):
        generate(2, 0, 0)


@pytest.mark.parametrize("generate", [generate_news, generate_credit, generate_transactions])
def test_five_banks_of_thousand_rows_are_fast(generate) -> None:
    start = time.perf_counter()
    generate(5, 1000, 0)
    assert time.perf_counter() - start < 2.0


def test_plain_news_is_the_same_records_without_the_hard_cases() -> None:
    news, plain = generate_news(3, 200, 0), generate_news(3, 200, 0, "news_plain")
    pd.testing.assert_series_equal(news["bank"], plain["bank"])
    assert 0.85 < (news["sentiment"] == plain["sentiment"]).mean() < 1.0  # news alone has label noise
    assert not plain["text"].str.contains("although|despite|failed to|not ", case=False).any()
    train, test = train_test_split(plain, test_size=0.3, random_state=0)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    model = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform(train["text"]), train["sentiment"])
    assert (model.predict(vectorizer.transform(test["text"])) == test["sentiment"]).mean() > 0.9
