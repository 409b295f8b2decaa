"""Dealing a data set out to banks: every row lands once, test rows never reach a bank, the report is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR, compose_config
from fingpt_federated.data.bank_data import load_bank
from fingpt_federated.data.federation_layout import prepare_federation
from fingpt_federated.server.strategy_config import update_checks
from fingpt_federated.simulations.sim import with_registered_examples
from tests.conftest import require_shared_data


def federation_config(data: str, **federation) -> dict:
    fed = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "federation" / "natural.yaml"))
    fed.update(federation)
    data_cfg = OmegaConf.load(CONFIG_DIR / "data" / f"{data}.yaml")
    return OmegaConf.create({"data": data_cfg, "federation": fed, "seed": 0})


def test_a_simulation_registers_each_banks_train_rows_as_its_example_count(tmp_path):
    layout = prepare_federation(federation_config("synthetic_news"), tmp_path)
    cfg = with_registered_examples(compose_config(["model=tiny_encoder"]), layout)
    registry = update_checks(cfg.strategy).registered_examples
    banks = zip(layout.bank_names, layout.bank_dirs, strict=True)
    assert registry == {name: len(load_bank(folder).train) for name, folder in banks}


def test_synthetic_banks_are_the_generated_profiles_and_test_rows_stay_out(tmp_path):
    layout = prepare_federation(federation_config("synthetic_news"), tmp_path)
    assert len(layout.bank_dirs) == 5 and layout.bank_names[0].endswith("retail")
    banks = [load_bank(d) for d in layout.bank_dirs]
    test = load_bank(layout.test_dir).train
    for bank in banks:
        assert bank.train.keys["bank"].tolist() == [bank.train.keys["bank"][0]] * len(bank.train)
    generated = pd.read_csv(tmp_path / "synthetic_data" / "news.csv")
    assert sum(len(b.train) + len(b.valid) for b in banks) + len(test) == len(generated)
    assert layout.train_counts.sum() + layout.valid_counts.sum() == len(generated) - len(test)
    assert all(len(b.valid) > 0 for b in banks)


def test_dirichlet_split_is_seeded_and_skewed(tmp_path):
    cfg = federation_config("synthetic_news", partitioner="dirichlet", key=None, num_banks=4, alpha=0.1)
    first = prepare_federation(cfg, tmp_path / "a")
    second = prepare_federation(cfg, tmp_path / "b")
    np.testing.assert_array_equal(first.train_counts, second.train_counts)
    shares = first.train_counts / first.train_counts.sum(axis=1, keepdims=True)
    assert shares.max(axis=1).mean() > 0.6


def test_natural_key_must_be_a_kept_column(tmp_path):
    with pytest.raises(ValueError, match=r"federation.key='segment' must be one of data.keep_columns \['bank'\]"):
        prepare_federation(federation_config("synthetic_news", key="segment"), tmp_path)


def run_partition_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("fingpt-partition")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [str(script), f"hydra.run.dir={tmp_path}", *overrides], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_partition_command_prints_the_table_and_writes_heatmap_csv_and_config(tmp_path):
    result = run_partition_cli(tmp_path, "data=synthetic_credit", "seed=3")
    assert result.returncode == 0, result.stderr
    assert "bank_00_retail" in result.stdout and "total" in result.stdout
    assert (tmp_path / "banks_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(tmp_path / "banks.csv")
    assert len(table) == 5 and table["rows"].sum() > 0
    resolved = OmegaConf.load(tmp_path / "resolved_config.yaml")
    assert resolved.seed == 3 and resolved.data.name == "synthetic_credit"


@pytest.mark.slow
def test_partition_command_refuses_a_bad_override_without_writing_banks(tmp_path):
    result = run_partition_cli(tmp_path, "federation.partitioner=shuffle")
    assert result.returncode != 0
    assert "unknown partition method 'shuffle'" in result.stderr
    assert not (tmp_path / "banks").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_credit_by_education_gives_one_bank_per_segment(tmp_path):
    require_shared_data("credit_taiwan")
    result = run_partition_cli(tmp_path, "data=credit_taiwan", "federation.key=EDUCATION", "federation.min_size=5")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "banks.csv")
    assert table["bank"].tolist() == [f"EDUCATION={v}" for v in range(7)]
    assert table["rows"].sum() == 24000
