"""Bad bank data is refused before training, with one line naming file, row and column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.loading import load_dataset

CREDIT = {
    "name": "toy_credit",
    "files": {"train": None},
    "text": {"template": "{age}-year-old {sex}", "value_maps": {"sex": {1: "male", 2: "female"}}},
    "label": {"column": "default", "classes": {0: "repaid", 1: "default"}},
    "series": {"layout": "wide", "features": {"status": ["s1", "s2", "s3"], "paid": ["p1", "p2", "p3"]}},
}


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def credit_rows(n: int = 6) -> list[dict]:
    return [
        {"age": 30 + i, "sex": 1 + i % 2, "s1": i, "s2": -1, "s3": 0, "p1": 10.5, "p2": 0, "p3": 3, "default": i % 2}
        for i in range(n)
    ]


def config_for(path: Path, **changes) -> dict:
    cfg = json.loads(json.dumps(CREDIT))
    cfg["files"]["train"] = str(path)
    cfg.update(changes)
    return cfg


def test_a_valid_wide_table_becomes_text_series_and_labels(tmp_path):
    data = load_dataset(config_for(write_csv(tmp_path / "ok.csv", credit_rows())))
    assert data.texts[:2] == ["30-year-old male", "31-year-old female"]
    assert data.series.shape == (6, 3, 2) and data.feature_names == ["status", "paid"]
    assert data.series[2, :, 0].tolist() == [2.0, -1.0, 0.0]
    assert data.mask.all() and data.labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_missing_column_names_file_and_column(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "p2"} for r in credit_rows()]
    path = write_csv(tmp_path / "bank.csv", rows)
    with pytest.raises(DataError) as err:
        load_dataset(config_for(path))
    assert str(err.value).startswith(f"{path}, column 'p2': missing series column")
    assert "\n" not in str(err.value)


def test_nan_in_a_sequence_names_row_and_column(tmp_path):
    rows = credit_rows()
    rows[3]["s2"] = float("nan")
    path = write_csv(tmp_path / "bank.csv", rows)
    with pytest.raises(DataError, match=r"bank\.csv, row 4, column 's2': empty value"):
        load_dataset(config_for(path))


@pytest.mark.parametrize("bad", ["inf", "abc", "1,5"])
def test_non_numeric_or_infinite_sequence_value_is_refused(tmp_path, bad):
    rows = credit_rows()
    rows[1]["p3"] = bad
    with pytest.raises(DataError, match=rf"row 2, column 'p3': value '{bad}' is not a finite number"):
        load_dataset(config_for(write_csv(tmp_path / "bank.csv", rows)))


def test_unknown_label_names_row_and_lists_known_ones(tmp_path):
    rows = credit_rows()
    rows[5]["default"] = 7
    with pytest.raises(DataError, match=r"row 6, column 'default': unknown label '7'; label.classes maps \['0', '1'\]"):
        load_dataset(config_for(write_csv(tmp_path / "bank.csv", rows)))


def test_missing_label_is_refused(tmp_path):
    rows = credit_rows()
    rows[0]["default"] = None
    with pytest.raises(DataError, match=r"row 1, column 'default': missing label"):
        load_dataset(config_for(write_csv(tmp_path / "bank.csv", rows)))


def test_empty_file_and_header_only_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.csv: file is empty"):
        load_dataset(config_for(empty))
    header = tmp_path / "header.csv"
    header.write_text("age,sex,default\n")
    with pytest.raises(DataError, match="header.csv: file has no data rows"):
        load_dataset(config_for(header))


def test_wrong_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\nok,0\ncaf\xe9 gains,1\n".encode("latin-1"))
    cfg = {
        "files": {"train": str(path)},
        "text": {"column": "text"},
        "label": {"column": "label", "classes": ["0", "1"]},
    }
    with pytest.raises(DataError, match=r"latin.csv: line 3 is not valid utf-8 \(byte 0xe9\); set data.encoding"):
        load_dataset(cfg)
    assert load_dataset({**cfg, "encoding": "latin-1"}).texts[1] == "café gains"


def test_empty_text_is_refused(tmp_path):
    path = write_csv(tmp_path / "news.csv", [{"text": "EPS beat", "label": 0}, {"text": "  ", "label": 1}])
    cfg = {
        "files": {"train": str(path)},
        "text": {"column": "text"},
        "label": {"column": "label", "classes": ["0", "1"]},
    }
    with pytest.raises(DataError, match=r"row 2, column 'text': empty text"):
        load_dataset(cfg)


def test_csv_parquet_and_jsonl_give_the_same_records(tmp_path):
    frame = pd.DataFrame(credit_rows(8))
    frame.to_csv(tmp_path / "b.csv", index=False)
    frame.to_parquet(tmp_path / "b.parquet", index=False)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in frame.to_dict("records")))
    loaded = [load_dataset(config_for(tmp_path / f"b.{ext}")) for ext in ("csv", "parquet", "jsonl")]
    for other in loaded[1:]:
        assert other.texts == loaded[0].texts
        np.testing.assert_array_equal(other.series, loaded[0].series)
        np.testing.assert_array_equal(other.labels, loaded[0].labels)


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"age": 3}\n{"age": \n')
    with pytest.raises(DataError, match=r"b.jsonl, row 2: not valid JSON"):
        load_dataset(config_for(path))


def test_a_bank_refuses_to_start_on_invalid_data(tmp_path):
    rows = credit_rows(20)
    rows[11]["s1"] = "n/a"
    path = write_csv(tmp_path / "bank.csv", rows)
    config = tmp_path / "bank.yaml"
    config.write_text(json.dumps(config_for(path)))
    with pytest.raises(DataError, match=r"row 12, column 's1'"):
        load_bank(config)


def test_bank_config_gives_a_deterministic_stratified_train_valid_split(tmp_path):
    config = tmp_path / "bank.yaml"
    rows = write_csv(tmp_path / "bank.csv", credit_rows(40))
    config.write_text(json.dumps(config_for(rows, split={"valid_fraction": 0.25})))
    first, second = load_bank(config), load_bank(config)
    assert (len(first.train), len(first.valid)) == (30, 10)
    assert first.valid.texts == second.valid.texts
    assert first.valid.label_counts().tolist() == [5, 5]
