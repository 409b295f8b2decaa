"""Bad bank data is refused before training, with one line naming file, row and column."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.errors import DataError
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.infer.inputs import check_record

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


# Numbers out of range: never an OverflowError, never inf or NaN in a model input; one line with file, row, column.

BIG_INT = "1" + "0" * 400  # 10**400: a JSON integer beyond any float
HUGE_INT = "7" * 5000  # beyond Python's 4,300-digit limit for int() too


def write_jsonl_with(path: Path, column: str, token: str, row: int = 3) -> Path:
    """credit_rows as JSONL, with `token` written verbatim (unquoted JSON) as `column` of 1-based `row`."""
    lines = []
    for i, record in enumerate(credit_rows(), start=1):
        if i == row:
            record = {**record, column: "__TOKEN__"}
        lines.append(json.dumps(record).replace('"__TOKEN__"', token))
    path.write_text("\n".join(lines) + "\n")
    return path


NOT_FINITE = "is not a finite number"
OUT_OF_RANGE = r"is out of range \(at most 3.4e\+38 in magnitude\)"


@pytest.mark.parametrize(
    ("column", "token", "problem"),
    [
        ("s1", BIG_INT, rf"value '1000000000000000000000000000000000000000'\.\.\. \(401 characters\) {NOT_FINITE}"),
        ("s1", f"-{BIG_INT}", NOT_FINITE),
        ("s1", HUGE_INT, rf"\(5000 characters\) {NOT_FINITE}"),
        ("p1", "1e400", f"value 'inf' {NOT_FINITE}"),
        ("p1", "-1e400", f"value '-inf' {NOT_FINITE}"),
        ("p1", "1e39", OUT_OF_RANGE),
        ("p2", "NaN", f"value 'nan' {NOT_FINITE}"),
        ("p2", "Infinity", f"value 'inf' {NOT_FINITE}"),
        ("p2", '"nan"', f"value 'nan' {NOT_FINITE}"),
        ("p2", '"-inf"', f"value '-inf' {NOT_FINITE}"),
        ("age", BIG_INT, NOT_FINITE),  # a number in the text template
        ("age", "1e400", f"value 'inf' {NOT_FINITE}"),
        ("age", "NaN", f"value 'nan' {NOT_FINITE}"),
        ("sex", '"Infinity"', f"value 'Infinity' {NOT_FINITE}"),  # a value-mapped template field
        ("default", BIG_INT, r"unknown label '1000000000000000000000000000000000000000'\.\.\. \(401 characters\)"),
        ("default", "1e400", "unknown label 'inf'"),
        ("default", "NaN", "missing label"),
    ],
)
def test_out_of_range_jsonl_numbers_are_one_line_data_errors(tmp_path, column, token, problem):
    path = write_jsonl_with(tmp_path / "bank.jsonl", column, token)
    with pytest.raises(DataError) as err:
        load_dataset(config_for(path))
    message = str(err.value)
    assert "\n" not in message and len(message) < 300
    assert message.startswith(f"{path}, row 3, column '{column}': ") and re.search(problem, message), message


@pytest.mark.parametrize(
    ("column", "cell", "problem"),
    [
        ("s2", "1e400", f"value '1e400' {NOT_FINITE}"),
        ("s2", "-3.5e38", f"value '-3.5e38' {OUT_OF_RANGE}"),
        ("p3", "NaN", f"value 'NaN' {NOT_FINITE}"),
        ("age", "inf", f"value 'inf' {NOT_FINITE}"),
        ("age", "nan", f"value 'nan' {NOT_FINITE}"),
    ],
)
def test_out_of_range_csv_numbers_are_one_line_data_errors(tmp_path, column, cell, problem):
    rows = credit_rows()
    rows[4][column] = cell
    path = write_csv(tmp_path / "bank.csv", rows)
    with pytest.raises(DataError, match=rf"bank\.csv, row 5, column '{column}': {problem}$"):
        load_dataset(config_for(path))


def test_the_largest_float32_still_loads(tmp_path):
    rows = credit_rows()
    rows[4]["p1"] = "3.4e38"
    data = load_dataset(config_for(write_csv(tmp_path / "bank.csv", rows)))
    assert np.isfinite(data.series).all() and data.series[4, 0, 1] == np.float32(3.4e38)


def test_a_number_formatted_template_field_must_be_a_number_in_every_row(tmp_path):
    rows = credit_rows()
    rows[2]["age"] = "thirty"
    cfg = config_for(write_csv(tmp_path / "bank.csv", rows), text={"template": "{age:.0f} years"})
    with pytest.raises(DataError, match=r"row 3, column 'age': value 'thirty' is not a finite number"):
        load_dataset(cfg)
    rows[2]["age"] = 41.6
    cfg = config_for(write_csv(tmp_path / "bank.csv", rows), text={"template": "{age:.0f} years"})
    assert load_dataset(cfg).texts[2] == "42 years"


def test_a_scaled_window_that_overflows_float32_is_refused_at_its_row(tmp_path):
    prices = [1.0, 2.0, 3.0, 1e-37, 1e5, 1.0, 2.0, 3.0]
    path = write_csv(tmp_path / "prices.csv", [{"ticker": "A", "day": d, "close": p} for d, p in enumerate(prices)])
    cfg = {
        "files": {"train": str(path)},
        "text": {},
        "label": {"future": {"column": "close", "horizon": 1}},
        "series": {
            "layout": "windows",
            "group_column": "ticker",
            "time_column": "day",
            "features": ["close"],
            "length": 2,
            "scale": "first_step",
        },
    }
    with pytest.raises(DataError, match=r"prices\.csv, row 5: a series value derived from this row .* overflows"):
        load_dataset(cfg)


def test_request_series_values_must_be_finite_float32(tmp_path):
    manifest = {"num_features": 2, "data": {"name": "prices"}, "model": {"series_encoder": {"max_steps": 4}}}
    check_record({"series": [[1.0, -2.5], [3.4e38, 0]]}, manifest)
    expected = "'series' step 1 value 0 is not a finite number within float32 range (at most 3.4e+38 in magnitude)"
    for bad in (10**400, float("inf"), float("nan"), 1e39, True, "1"):
        with pytest.raises(ValueError) as err:
            check_record({"series": [[1.0, 2.0], [bad, 0.0]]}, manifest)
        assert str(err.value) == expected  # where, not what: the value itself is never echoed


def test_a_bank_refuses_to_start_on_a_jsonl_integer_of_10_to_the_400(tmp_path, capsys):
    from fingpt_federated.client.cli import main as client_main
    from fingpt_federated.federation.node_keys import generate_bank_keys

    path = write_jsonl_with(tmp_path / "bank.jsonl", "s3", BIG_INT, row=2)
    config = tmp_path / "bank.yaml"
    config.write_text(json.dumps(config_for(path)))
    private, _ = generate_bank_keys(tmp_path / "bank")
    ca = tmp_path / "ca.crt"
    ca.write_text("unused: the data is checked first\n")
    code = client_main(
        ["start", "--server", "127.0.0.1:9", "--ca", str(ca), "--key", str(private), "--data", str(config)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{path}, row 2, column 's3': value '1000" in err


def run_cli(executable: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name(executable)
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def write_credit_taiwan_jsonl(path: Path, column: str, token: str, row: int) -> Path:
    """40 rows with the columns of conf/data/credit_taiwan.yaml, `token` verbatim as `column` of `row`."""
    pay = [f"PAY_{i}" for i in (0, 2, 3, 4, 5, 6)]
    amounts = [f"{kind}{i}" for kind in ("BILL_AMT", "PAY_AMT") for i in range(1, 7)]
    lines = []
    for i in range(1, 41):
        record = {
            "LIMIT_BAL": 10000 + i,
            "SEX": 1 + i % 2,
            "EDUCATION": 1 + i % 3,
            "MARRIAGE": 1 + i % 2,
            "AGE": 20 + i,
        }
        record.update({c: i % 3 for c in pay} | {c: 100 * i for c in amounts} | {"default.payment.next.month": i % 2})
        if i == row:
            record[column] = "__TOKEN__"
        lines.append(json.dumps(record).replace('"__TOKEN__"', token))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_fingpt_partition_errors_are_one_line_with_exit_code_2(tmp_path):
    bad = write_credit_taiwan_jsonl(tmp_path / "bank.jsonl", "PAY_AMT3", BIG_INT, row=7)
    cases = {
        "data": (
            ["data=credit_taiwan", f"data.files.train={bad}"],
            rf"{re.escape(str(bad))}, row 7, column 'PAY_AMT3'",
        ),
        "type": (
            ["model.lora.r=abc"],
            r"override model\.lora\.r=abc: Value 'abc' of type 'str' could not be converted",
        ),
        "group": (["data=nope"], r"Could not find 'data/nope': options: .*synthetic_credit"),
    }
    for case, (overrides, expected) in cases.items():
        out = tmp_path / case
        result = run_cli("fingpt-partition", f"hydra.run.dir={out}", *overrides, cwd=tmp_path)
        assert result.returncode == 2, (case, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, (case, result.stderr)
        assert re.match(rf"fingpt-partition: error: .*{expected}", result.stderr), (case, result.stderr)
        assert not (out / "banks").exists()


@pytest.mark.slow
def test_fingpt_infer_predict_refuses_a_jsonl_integer_of_10_to_the_400_in_one_line(tmp_path, tiny_setting):
    from infer_fixtures import train_and_publish, write_table

    published = train_and_publish(tmp_path / "pub", ["fp32"], steps=1)
    rows = pd.read_csv(write_table(tmp_path / "in.csv", 4, seed=3)).to_dict("records")
    rows[1]["v2"] = "__TOKEN__"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("\n".join(json.dumps(r).replace('"__TOKEN__"', BIG_INT) for r in rows) + "\n")
    audit = tmp_path / "audit.jsonl"
    result = run_cli("fingpt-infer", "predict", str(published), str(jsonl), "--audit-log", str(audit), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{jsonl}, row 2, column 'v2': value '1000" in result.stderr and not audit.exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ({"series": "nan"}, r"arrays\.npz: record 2 has a NaN, infinite or beyond-float32 series value"),
        ({"series": "big"}, r"arrays\.npz: record 2 has a NaN, infinite or beyond-float32 series value"),
        ({"labels": 7}, r"arrays\.npz: record 2 has label 7, not one of the 2 classes"),
        ({"labels": -1}, r"arrays\.npz: record 2 has label -1"),
        ({"npz": b"PK\x03\x04 truncated"}, r"arrays\.npz: not a readable saved data set"),
        ({"meta": b'{"texts": '}, r"meta\.json: not readable"),
    ],
)
def test_a_doctored_prepared_bank_folder_is_refused_in_one_line(tmp_path, damage, problem):
    from fingpt_federated.data.bank_data import BankData, save_bank

    data = load_dataset(config_for(write_csv(tmp_path / "bank.csv", credit_rows())))
    folder = save_bank(BankData("bank", data, None), tmp_path / "prepared")
    arrays_path, meta_path = folder / "train" / "arrays.npz", folder / "train" / "meta.json"
    with np.load(arrays_path) as saved:
        arrays = dict(saved)
    if "series" in damage:
        arrays["series"] = arrays["series"].astype(np.float64)
        arrays["series"][1, 0, 0] = np.nan if damage["series"] == "nan" else 1e300
    if "labels" in damage:
        arrays["labels"][1] = damage["labels"]
    np.savez(arrays_path, **arrays)
    if "npz" in damage:
        arrays_path.write_bytes(damage["npz"])
    if "meta" in damage:
        meta_path.write_bytes(damage["meta"])
    with pytest.raises(DataError, match=problem) as err:
        load_bank(folder)
    assert "\n" not in str(err.value)
