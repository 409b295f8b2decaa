"""Delimited tables read by the data config's `table:` options alone (data/delimited.py): a Latin-1
`sentence@label` file and a whitespace-separated coded credit file, both without a header, generated
from the synthetic data; bad rows named by the file's own lines; unknown data keys refused in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fingpt_federated.conf import compose_config
from fingpt_federated.conf.schema import SchemaCheck
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.config import data_config
from fingpt_federated.data.errors import DataConfigError, DataError
from fingpt_federated.data.federation_layout import prepare_federation
from fingpt_federated.data.loading import load_dataset
from fingpt_federated.data.synthetic import EDUCATION, generate_credit, generate_news

SEX_CODES = {"male": 1, "female": 2}
MARITAL_CODES = {"married": 1, "single": 2, "other": 3}
CREDIT_COLUMNS = [
    "sex",
    "education",
    "marital",
    "age",
    "credit_limit",
    *[f"{kind}_{m}" for kind in ("status", "bill", "paid") for m in range(1, 7)],
    "default",
]


def write_at_file(path: Path, rows: int = 60, bad_line: int | None = None) -> Path:
    """`sentence@label` lines in Latin-1, no header; sentence 3 names a French bank (non-ASCII).
    With `bad_line`, that line's sentence holds an '@' (one field too many)."""
    news = generate_news(2, rows // 2, seed=0).head(rows)
    lines = [f"{text}@{label}" for text, label in zip(news["text"], news["sentiment"], strict=True)]
    lines[2] = f"Société Générale shares rose 3%@{news['sentiment'].iat[2]}"
    if bad_line is not None:
        lines[bad_line - 1] = f"Profit hit @ record high@{news['sentiment'].iat[bad_line - 1]}"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


def at_config(path: Path) -> dict:
    return {
        "name": "at_sentences",
        "files": {"train": str(path)},
        "format": "csv",
        "encoding": "latin-1",
        "table": {"delimiter": "@", "header": False, "columns": ["sentence", "label"], "quote": None},
        "text": {"column": "sentence"},
        "label": {"column": "label", "classes": ["bearish", "bullish", "neutral"]},
        "split": {"test_fraction": 0.2},
    }


def write_space_file(path: Path, rows: int = 60, bad: tuple[int, str, str] | None = None) -> Path:
    """Coded credit records separated by runs of spaces and tabs, no header, two comment lines on top.
    `bad` = (data record number, column, value) puts a bad value there."""
    credit = generate_credit(2, rows // 2, seed=0).head(rows).copy()
    credit["sex"] = credit["sex"].map(SEX_CODES)
    credit["education"] = credit["education"].map({name: i + 1 for i, name in enumerate(EDUCATION)})
    credit["marital"] = credit["marital"].map(MARITAL_CODES)
    for kind in ("bill", "paid"):
        for m in range(1, 7):
            credit[f"{kind}_{m}"] = credit[f"{kind}_{m}"].round(2)
    table = credit[CREDIT_COLUMNS].astype(str)
    if bad is not None:
        record, column, value = bad
        table.at[table.index[record - 1], column] = value
    body = ["  ".join(row) if i % 2 else "\t".join(row) for i, row in enumerate(table.to_numpy().tolist())]
    path.write_text("# coded credit records\n# sex 1=male 2=female\n" + "\n".join(body) + "\n", encoding="utf-8")
    return path


def space_config(path: Path) -> dict:
    return {
        "name": "coded_credit",
        "files": {"train": str(path)},
        "format": "csv",
        "table": {"delimiter": "whitespace", "header": False, "columns": CREDIT_COLUMNS, "comment": "#"},
        "text": {
            "template": "A {age}-year-old {sex} applicant, {marital}, education: {education}.",
            "value_maps": {
                "sex": {code: name for name, code in SEX_CODES.items()},
                "marital": {code: name for name, code in MARITAL_CODES.items()},
                "education": {i + 1: name for i, name in enumerate(EDUCATION)},
            },
        },
        "label": {"column": "default", "classes": {0: "repaid", 1: "default"}},
        "series": {
            "layout": "wide",
            "features": {kind: [f"{kind}_{m}" for m in range(1, 7)] for kind in ("status", "bill", "paid")},
        },
        "keep_columns": ["education"],
    }


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def test_a_latin1_sentence_at_label_file_without_header_reads_by_yaml_alone(tmp_path):
    source = write_at_file(tmp_path / "news.txt")
    bank = load_bank(write_yaml(tmp_path / "bank.yaml", at_config(source)))  # a bank's own data config
    assert len(bank.train) + len(bank.valid) == 60 and bank.train.class_names == ["bearish", "bullish", "neutral"]
    data = load_dataset(at_config(source))
    assert data.texts[2] == "Société Générale shares rose 3%" and data.series is None


def test_a_whitespace_file_without_header_reads_by_yaml_alone(tmp_path):
    source = write_space_file(tmp_path / "credit.dat")
    data = load_dataset(data_config(yaml.safe_load(write_yaml(tmp_path / "c.yaml", space_config(source)).read_text())))
    credit = generate_credit(2, 30, seed=0)
    assert len(data) == 60 and data.feature_names == ["status", "bill", "paid"]
    assert data.labels.tolist() == credit["default"].tolist()
    assert data.texts[0] == (
        f"A {credit['age'][0]}-year-old {credit['sex'][0]} applicant, {credit['marital'][0]}, "
        f"education: {credit['education'][0]}."
    )
    assert data.series[0, :, 0].tolist() == credit[[f"status_{m}" for m in range(1, 7)]].iloc[0].tolist()


def test_table_options_through_hydra_overrides_and_the_federation(tmp_path):
    source = write_space_file(tmp_path / "credit.dat")
    overrides = [
        "data=synthetic_credit",
        "data.synthetic=null",
        "model=tiny_encoder",
        f"data.files.train={source}",
        "data.format=csv",
        "data.table.delimiter=whitespace",
        "data.table.header=false",
        f"data.table.columns=[{','.join(CREDIT_COLUMNS)}]",
        "data.table.comment='#'",
        "data.text.template='{age} years, {sex}'",
        "data.keep_columns=[education]",
        "federation.key=education",
        "federation.min_size=2",
    ]
    layout = prepare_federation(compose_config(overrides), tmp_path / "fed")
    assert layout.bank_names == [f"education={code}" for code in range(1, 5)][: len(layout.bank_names)]
    assert layout.num_features == 3 and int(layout.train_counts.sum() + layout.valid_counts.sum()) == 48


def test_a_bad_row_of_the_at_file_names_the_line(tmp_path):
    source = write_at_file(tmp_path / "news.txt", bad_line=10)
    with pytest.raises(DataError) as error:
        load_dataset(at_config(source))
    assert str(error.value) == (f"{source}, row 10: 3 fields, but data.table.columns names 2 columns (delimiter '@')")


def test_a_bad_row_of_the_whitespace_file_counts_the_comment_lines(tmp_path):
    source = write_space_file(tmp_path / "credit.dat", bad=(7, "bill_3", "n/a"))
    with pytest.raises(DataError) as error:  # record 7 is line 9: two comment lines above it
        load_dataset(space_config(source))
    assert str(error.value) == f"{source}, row 9, column 'bill_3': value 'n/a' is not a finite number"
    short = tmp_path / "short.dat"
    lines = source.read_text().splitlines()
    lines[4] = lines[4].rsplit(maxsplit=1)[0]  # record 3 loses its class
    short.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        load_dataset({**space_config(short), "files": {"train": str(short)}})
    assert (
        str(error.value) == f"{short}, row 5: 23 fields, but data.table.columns names 24 columns (delimiter whitespace)"
    )


def test_rows_count_the_file_lines_after_skipped_rows_comments_and_a_header(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('exported 2024-01-01\n\nid;text;y\n1;"a; quoted";0\n# note\n\n2;"two\nlines";1\n3;;1\n')
    cfg = {
        "files": {"train": str(path)},
        "table": {"delimiter": ";", "skip_rows": 2, "comment": "#"},
        "text": {"column": "text"},
        "label": {"column": "y", "classes": {0: "no", 1: "yes"}},
    }
    with pytest.raises(DataError) as error:
        load_dataset(cfg)
    assert str(error.value) == f"{path}, row 8, column 'text': empty text"  # line 9 of the file
    path.write_text(path.read_text().replace("3;;1", "3;c;1"))
    data = load_dataset(cfg)
    assert data.texts == ["a; quoted", "two\nlines", "c"] and data.labels.tolist() == [0, 1, 1]


def test_a_header_is_renamed_by_columns_and_quotes_may_be_turned_off(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('A,B\n"x,1\n"y,0\n')
    data = load_dataset(
        {
            "files": {"train": str(path)},
            "table": {"columns": ["text", "y"], "quote": None},
            "text": {"column": "text"},
            "label": {"column": "y", "classes": {0: "no", 1: "yes"}},
        }
    )
    assert data.texts == ['"x', '"y']


def test_whitespace_fields_may_be_quoted(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text('"up strongly"  1\n  down\t0\n"bad 1\n')
    cfg = {
        "files": {"train": str(path)},
        "format": "csv",
        "table": {"delimiter": "whitespace", "header": False, "columns": ["text", "y"]},
        "text": {"column": "text"},
        "label": {"column": "y", "classes": {0: "no", 1: "yes"}},
    }
    with pytest.raises(DataError, match=re.escape(f"{path}, row 3: unbalanced \" quote in '\"bad'")):
        load_dataset(cfg)
    path.write_text('"up strongly"  1\n  down\t0\n')
    assert load_dataset(cfg).texts == ["up strongly", "down"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"delimiter": "@@"}, "data.table.delimiter: must be one character or 'whitespace', got '@@'"),
        ({"header": False}, "data.table.columns: a file without a header (data.table.header: false) needs them"),
        ({"quote": ","}, "data.table.quote: ',' is also the delimiter"),
        ({"skip_rows": -1}, "data.table.skip_rows: must be 0 or more, got -1"),
        ({"columns": ["a", "a"]}, "data.table.columns: names a more than once"),
    ],
)
def test_bad_table_options_are_one_line_config_errors(tmp_path, table, message):
    path = tmp_path / "t.csv"
    path.write_text("a,b\nx,1\n")
    with pytest.raises(DataConfigError) as error:
        load_dataset(
            {
                "files": {"train": str(path)},
                "table": table,
                "text": {"column": "a"},
                "label": {"column": "b", "classes": {1: "one"}},
            }
        )
    assert str(error.value) == message


def test_table_options_on_a_jsonl_file_are_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": "x", "b": 1}\n')
    with pytest.raises(DataError, match=r"data.table options apply to delimited text \(format csv\), not jsonl"):
        load_dataset({"files": {"train": str(path)}, "table": {"delimiter": ";"}, "text": {"column": "a"}})


def test_an_unknown_data_key_is_refused_naming_the_keys_there_are():
    with pytest.raises(DataConfigError) as error:
        data_config({"sep": "@"})
    assert str(error.value).startswith("data.sep: unknown key; data takes name, synthetic, format, encoding, table,")
    with pytest.raises(DataConfigError, match=r"^data\.table\.sep: unknown key; data\.table takes delimiter, header"):
        data_config({"table": {"sep": "@"}})


def test_a_forced_unknown_key_ends_a_hydra_command_in_one_line(capsys, monkeypatch):
    from hydra import compose, initialize_config_dir

    from fingpt_federated.conf import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+data.sep=@"])  # composes: `+` forces the key in
    monkeypatch.setattr("sys.argv", ["fingpt-sim"])
    with pytest.raises(SystemExit) as stop:
        SchemaCheck().on_job_start(config=cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "fingpt-sim: error: data.sep: Key 'sep' not in 'DataConfig'\n"


@pytest.mark.slow
def test_fingpt_partition_reads_the_at_file_by_yaml_alone_and_refuses_unknown_keys(tmp_path):
    from test_data_validation import run_cli

    source = write_at_file(tmp_path / "news.txt")
    (tmp_path / "conf" / "data").mkdir(parents=True)
    write_yaml(tmp_path / "conf" / "data" / "at_sentences.yaml", at_config(source))
    common = ["--config-dir", str(tmp_path / "conf"), "data=at_sentences", "federation=iid", "federation.num_banks=2"]
    result = run_cli("fingpt-partition", *common, f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 banks written" in result.stdout and (tmp_path / "out" / "banks" / "bank_01").is_dir()
    refused = run_cli("fingpt-partition", *common, "+data.sep=@", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith("fingpt-partition: error: data.sep: "), refused.stderr


def test_bench_centralized_reports_a_bad_row_in_one_line(tmp_path, capsys):
    from fingpt_federated.simulations.bench_centralized import main

    source = write_at_file(tmp_path / "news.txt", bad_line=10)
    overrides = [
        "data.synthetic=null",
        "data.keep_columns=[]",
        f"data.files.train={source}",
        "data.format=csv",
        "data.encoding=latin-1",
        "data.table.delimiter=@",
        "data.table.header=false",
        "data.table.columns=[sentence,label]",
        "data.table.quote=null",
        "data.text.column=sentence",
        "data.label.column=label",
    ]
    with pytest.raises(SystemExit) as stop:
        main(["synthetic_news", *overrides])
    assert stop.value.code == (
        f"bench_centralized: error: {source}, row 10: 3 fields, but data.table.columns names 2 columns (delimiter '@')"
    )
    for unknown in ("+data.sep=@", "data.sep=@"):  # forced past composition, or refused by it
        with pytest.raises(SystemExit) as stop:
            main(["synthetic_news", unknown])
        printed = capsys.readouterr().err
        assert stop.value.code == 2 and printed.count("\n") == 1, printed
        assert printed.startswith("bench_centralized: error: ") and "data.sep" in printed, printed
