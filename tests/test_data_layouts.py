"""Sequences from event tables and price histories; the four real data configs as a user writes them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fingpt_federated.data.bank_data import BankData, load_bank, save_bank
from fingpt_federated.data.errors import DataConfigError
from fingpt_federated.data.loading import load_dataset, load_splits
from tests.conftest import require_shared_data


def events_config(tmp_path, max_steps: int = 2) -> dict:
    accounts = pd.DataFrame({"acct": [1, 2, 3], "flag": [0, 1, 0], "kind": ["a", "b", "a"]})
    accounts.to_csv(tmp_path / "acc.csv", index=False)
    pd.DataFrame(
        {
            "src": [1, 2, 1, 9, 1],
            "dst": [2, 9, 9, 1, 2],
            "amount": [10.0, 20.0, 30.0, 40.0, 50.0],
            "t": [1, 2, 3, 4, 5],
        }
    ).to_csv(tmp_path / "tx.csv", index=False)
    return {
        "files": {"train": str(tmp_path / "acc.csv")},
        "text": {"template": "{kind} account, {n_events} transfers, {n_as_src} sent, total {sum_amount:.0f}"},
        "label": {"column": "flag", "classes": {0: "normal", 1: "suspicious"}},
        "series": {
            "layout": "long",
            "path": str(tmp_path / "tx.csv"),
            "key": "acct",
            "id_columns": ["src", "dst"],
            "time_column": "t",
            "value_columns": ["amount"],
            "time_delta": True,
            "max_steps": max_steps,
        },
    }


def test_long_layout_keeps_the_latest_events_per_key_with_roles(tmp_path):
    data = load_dataset(events_config(tmp_path))
    assert data.feature_names == ["amount", "as_src", "as_dst", "time_delta"]
    # account 1: sent 10 at t1, sent 30 at t3, received 40 at t4, sent 50 at t5 -> keep the last two
    np.testing.assert_array_equal(data.series[0], [[40.0, 0, 1, 1.0], [50.0, 1, 0, 1.0]])
    # account 2: received 10 at t1, sent 20 at t2, received 50 at t5
    np.testing.assert_array_equal(data.series[1][:, 0], [20.0, 50.0])
    assert data.mask[:2].all()
    assert not data.mask[2].any() and (data.series[2] == 0).all()  # no transfers: an empty sequence
    assert data.texts == [
        "a account, 4 transfers, 3 sent, total 130",
        "b account, 3 transfers, 1 sent, total 80",
        "a account, 0 transfers, 0 sent, total 0",
    ]


def test_long_layout_pads_ragged_sequences_at_the_end(tmp_path):
    data = load_dataset(events_config(tmp_path, max_steps=5))
    assert data.mask.sum(axis=1).tolist() == [4, 3, 0]
    assert data.mask[1].tolist() == [True, True, True, False, False]


def test_an_events_file_is_read_under_its_own_table_options(tmp_path):
    """A headerless `;` export with a comment line, as the records file (a plain CSV) is not."""
    cfg = events_config(tmp_path)
    rows = pd.read_csv(tmp_path / "tx.csv")
    lines = ["# transfers export"] + [";".join(str(v) for v in row) for row in rows.itertuples(index=False)]
    (tmp_path / "tx.txt").write_text("\n".join(lines) + "\n")
    cfg["series"] |= {"path": str(tmp_path / "tx.txt"), "table": {"delimiter": ";", "header": False, "comment": "#"}}
    cfg["format"] = "csv"
    cfg["series"]["table"]["columns"] = list(rows.columns)
    from_export = load_dataset(cfg)
    from_csv = load_dataset(events_config(tmp_path))
    np.testing.assert_array_equal(from_export.series, from_csv.series)
    assert from_export.texts == from_csv.texts

    cfg["series"]["table"] = {"delimiter": ";", "header": False}  # no column names for a headerless file
    with pytest.raises(DataConfigError, match=r"data\.series\.table\.columns"):
        load_dataset(cfg)


def test_windows_label_the_direction_horizon_steps_ahead(tmp_path):
    close = [10, 11, 12, 11, 10, 13, 9, 9]
    prices = pd.DataFrame({"day": range(8), "close": close, "vol": [100] * 8, "sym": "X"})
    prices.to_csv(tmp_path / "p.csv", index=False)
    cfg = {
        "files": {"train": str(tmp_path / "p.csv")},
        "text": {"template": "{sym}"},
        "label": {"future": {"column": "close", "horizon": 2}, "classes": {0: "down", 1: "up"}},
        "series": {
            "layout": "windows",
            "group_column": "sym",
            "time_column": "day",
            "features": ["close", "vol"],
            "length": 3,
            "stride": 1,
            "scale": "first_step",
        },
    }
    data = load_dataset(cfg)
    # windows end at days 2..5; label = close[end + 2] > close[end]
    assert data.labels.tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(data.series[0][:, 0], [0.0, 0.1, 0.2])
    assert data.class_names == ["down", "up"] and data.texts == ["X"] * 4


def test_prepared_bank_folder_round_trips(tmp_path):
    data = load_dataset(events_config(tmp_path, max_steps=3))
    save_bank(BankData("bank_a", data.subset([0, 2]), data.subset([1])), tmp_path / "bank")
    loaded = load_bank(tmp_path / "bank")
    assert loaded.name == "bank_a" and loaded.train.texts == [data.texts[0], data.texts[2]]
    np.testing.assert_array_equal(loaded.valid.series, data.series[[1]])
    np.testing.assert_array_equal(loaded.train.mask, data.mask[[0, 2]])


REAL = [
    ("tfns", ["tfns"], 9543, ["bearish", "bullish", "neutral"], 0),
    ("credit_taiwan", ["credit_taiwan"], 24000, ["repaid", "default"], 3),
    ("sp500", ["sp500_5yr"], None, ["down", "up"], 5),
    ("amlsim", ["amlsim"], 16000, ["normal", "laundering"], 4),
]


@pytest.mark.realdata
@pytest.mark.parametrize("name,folders,pool_size,classes,features", REAL)
def test_real_data_configs_load_and_split(data_config_dir, name, folders, pool_size, classes, features):
    require_shared_data(*folders)
    splits = load_splits(OmegaConf.load(data_config_dir / f"{name}.yaml"))
    assert splits.train.class_names == classes
    assert splits.train.num_features == features
    if pool_size is not None:
        assert len(splits.train) + len(splits.valid) == pool_size
    for part in (splits.train, splits.valid, splits.test):
        assert np.bincount(part.labels, minlength=len(classes)).min() > 0
        if part.series is not None:
            assert np.isfinite(part.series).all()


@pytest.mark.realdata
def test_sp500_test_windows_come_after_the_training_windows(data_config_dir):
    require_shared_data("sp500_5yr")
    splits = load_splits(OmegaConf.load(data_config_dir / "sp500.yaml"))
    assert max(splits.train.keys["date"]) < min(splits.test.keys["date"])
    assert set(splits.train.keys["Name"]) == {"AAPL", "BAC", "C", "GS", "JPM", "MS", "MSFT", "WFC"}
