"""Natural bank splits that merge key values by config (federation.key_map, federation.other_bank): a
split by a categorical key whose rare values (9 and 6 rows) stop the run today passes with each option,
and every merge is logged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fingpt_federated.conf import compose_config
from fingpt_federated.data.federation_layout import prepare_federation
from fingpt_federated.data.partitioning import merge_key_values

SIZES = {"A40": 40, "A43": 30, "A410": 9, "A48": 6}


def write_loans(path: Path, sizes: dict[str, int] = SIZES) -> Path:
    purposes = [purpose for purpose, count in sizes.items() for _ in range(count)]
    rows = [f"loan {i} for {purpose},{i % 2},{purpose}" for i, purpose in enumerate(purposes)]
    path.write_text("text,bad,purpose\n" + "\n".join(rows) + "\n")
    return path


def config(path: Path, **federation: object) -> dict:
    test = write_loans(path.with_name("test.csv"), {"A40": 6, "A48": 2})  # a test file: every row deals out
    data = {
        "files": {"train": str(path), "test": str(test)},
        "text": {"column": "text"},
        "label": {"column": "bad", "classes": {0: "good", 1: "bad"}},
        "keep_columns": ["purpose"],
    }
    fed = {"partitioner": "natural", "key": "purpose", "min_size": 10, **federation}
    return {"data": data, "federation": fed, "seed": 0}


def test_rare_values_stop_a_natural_split_without_an_option(tmp_path):
    with pytest.raises(ValueError, match=r"fewer than min_size=10 rows: A410 \(9\), A48 \(6\); .*federation\.key_map"):
        prepare_federation(config(write_loans(tmp_path / "loans.csv")), tmp_path / "fed")


def test_key_map_merges_categorical_values_into_one_bank(tmp_path, caplog):
    cfg = config(write_loans(tmp_path / "loans.csv"), key_map={"A410": "rare", "A48": "rare"})
    with caplog.at_level(logging.WARNING):
        layout = prepare_federation(cfg, tmp_path / "fed")
    assert layout.bank_names == ["purpose=A40", "purpose=A43", "purpose=rare"]
    rows = layout.train_counts.sum(axis=1) + layout.valid_counts.sum(axis=1)
    assert rows.tolist() == [40, 30, 15]
    assert "purpose values A410 (9), A48 (6) merged into bank purpose=rare" in caplog.text


def test_other_bank_takes_every_value_under_min_size(tmp_path, caplog):
    cfg = config(write_loans(tmp_path / "loans.csv"), other_bank="other")
    with caplog.at_level(logging.WARNING):
        layout = prepare_federation(cfg, tmp_path / "fed")
    assert layout.bank_names == ["purpose=A40", "purpose=A43", "purpose=other"]
    assert "purpose values A410 (9), A48 (6) merged into bank purpose=other" in caplog.text


def test_merges_compare_values_as_text_and_an_other_bank_too_small_still_fails():
    keys = np.array(["9", "9", "6", "1", "1", "1"], dtype=object)
    merged, merges = merge_key_values(keys, {"9": "x", "6": "x"}, 2, None)
    assert merged.tolist() == ["x", "x", "x", "1", "1", "1"] and merges == {"x": ["6", "9"]}
    merged, merges = merge_key_values(keys, {}, 3, "other")
    assert merged.tolist() == ["other"] * 3 + ["1"] * 3 and merges == {"other": ["6", "9"]}


def test_key_map_with_integer_keys_composes_and_refuses_bins(tmp_path):
    cfg = compose_config(["federation.key=purpose", "+federation.key_map={9: rare, 6: rare}"])
    assert dict(cfg.federation.key_map) == {9: "rare", 6: "rare"}
    bad = config(write_loans(tmp_path / "loans.csv"), key_map={"A48": "x"}, bins=[0, 1])
    with pytest.raises(ValueError, match="cannot be combined with federation.bins"):
        prepare_federation(bad, tmp_path / "fed")
