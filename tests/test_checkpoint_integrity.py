"""Tamper-evident run state: a checkpoint is verified before a run resumes from it, a run can go back to an
intact earlier round without losing the later ones, and a non-finite state is never resumed, loaded or published.

Finding 1 of issue 24: a checkpoint whose state.safetensors had 1,000 NaNs written over its bytes was resumed
without a check, trained on, and published. These tests write the same bytes and check that nothing trains.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from federation_helpers import (  # noqa: F401
    InProcessGrid,
    config,
    one_torch_thread,
    simulated_nodes,
    tiny_model,
    write_federation,
)
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file

from fingpt_federated.client.app import app as client_app
from fingpt_federated.conf import save_resolved_config
from fingpt_federated.federation import protocol
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import NonFiniteState, federated_state, load_federated_state
from fingpt_federated.privacy.dp_budget import PrivacyLedger, ledger_path
from fingpt_federated.server.app import CHECKPOINTS, FINAL_STATE, run_federation
from fingpt_federated.server.checkpoint import (
    ABANDONED,
    META_FILE,
    STATE_FILE,
    CheckpointCorrupt,
    Checkpointer,
    CheckpointError,
    file_sha256,
)
from fingpt_federated.server.history import History
from fingpt_federated.server.publish import MODEL_DIR, publish_run
from fingpt_federated.server.run_folder import FEDERATION_SPEC

NAN_COUNT = 1000


def federation(tmp_path: Path, *overrides: str):
    spec = write_federation(tmp_path / "data")
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(spec.banks))
    cfg = config("strategy.local_steps=2", "publish.enabled=false", *overrides)
    return cfg, spec, InProcessGrid(client_app, nodes, run_config)


def write_nans(path: Path, tensors: int = 3, count: int = NAN_COUNT) -> list[str]:
    """Overwrite `count` float32 values of the `tensors` largest tensors of a safetensors file with NaN, in
    place (the file keeps its size and its header parses), as finding 1 did; returns the tensors hit."""
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    floats = {name: entry for name, entry in header.items() if name != "__metadata__" and entry["dtype"] == "F32"}
    largest = sorted(floats, key=lambda name: floats[name]["data_offsets"][0] - floats[name]["data_offsets"][1])
    hit = largest[:tensors]
    left = count
    for i, name in enumerate(hit):
        start, end = floats[name]["data_offsets"]
        n = min((end - start) // 4, left // (tensors - i))
        offset = 8 + header_len + start
        raw[offset : offset + 4 * n] = np.full(n, np.nan, dtype=np.float32).tobytes()
        left -= n
    assert left == 0
    path.write_bytes(bytes(raw))
    return sorted(hit)


def rehash(folder: Path) -> None:
    """Rewrite meta.json's hashes to match the files, as someone covering their tracks would."""
    meta = json.loads((folder / META_FILE).read_text())
    meta["files"] = {name: file_sha256(folder / name) for name in meta["files"]}
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """A run folder after two real rounds (three in-process banks), copied by each test that alters it."""
    root = tmp_path_factory.mktemp("two-rounds")
    cfg, spec, grid = federation(root, "federation.rounds=2")
    run_federation(grid, cfg, spec, root / "run")
    save_resolved_config(cfg, root / "run")  # what fingpt-sim and fingpt-server write beside, for publishing
    spec.save(root / "run" / FEDERATION_SPEC)
    return root


@pytest.fixture
def run_copy(two_rounds, tmp_path):
    shutil.copytree(two_rounds, tmp_path, dirs_exist_ok=True)
    return tmp_path, tmp_path / "run"


def resume(root: Path, run_dir: Path, *overrides: str, rounds: int = 3):
    cfg, spec, grid = federation(root, f"federation.rounds={rounds}", *overrides)
    return grid, lambda: run_federation(grid, cfg, spec, run_dir)


def test_nan_bytes_written_into_the_latest_checkpoint_stop_the_resume_naming_the_file(run_copy):
    root, run_dir = run_copy
    state = run_dir / CHECKPOINTS / "round_0002" / STATE_FILE
    write_nans(state)
    grid, go = resume(root, run_dir)
    with pytest.raises(CheckpointCorrupt) as error:
        go()
    message = str(error.value)
    assert f"{state}: sha256 differs" in message
    assert "Intact earlier rounds: 1;" in message and "--from-round 1" in message
    assert grid.sent == []  # no bank was sent anything


def test_nan_values_with_rewritten_hashes_are_refused_naming_the_tensors(run_copy):
    root, run_dir = run_copy
    folder = run_dir / CHECKPOINTS / "round_0002"
    hit = write_nans(folder / STATE_FILE)
    rehash(folder)
    grid, go = resume(root, run_dir)
    with pytest.raises(CheckpointCorrupt, match=r"non-finite values \(NaN or inf\) in 3 of \d+ tensors") as error:
        go()
    assert str(folder / STATE_FILE) in str(error.value) and all(name in str(error.value) for name in hit)
    assert grid.sent == []


@pytest.mark.parametrize("rehashed", [False, True])
def test_a_truncated_state_file_is_named(run_copy, rehashed):
    root, run_dir = run_copy
    folder = run_dir / CHECKPOINTS / "round_0002"
    state = folder / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    if rehashed:
        rehash(folder)
    reason = "not a readable safetensors file" if rehashed else "sha256 differs"
    with pytest.raises(CheckpointCorrupt, match=f"{state}: {reason}"):
        resume(root, run_dir)[1]()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda folder: (folder / "history.json").unlink(), "history.json: missing"),
        (lambda folder: (folder / META_FILE).unlink(), "meta.json: missing"),
        (lambda folder: (folder / META_FILE).write_text("{"), "meta.json: not readable JSON"),
        (lambda folder: (folder / "server_state.safetensors").write_bytes(b"x"), "server_state.safetensors: not list"),
        (lambda folder: _drop_hashes(folder), "meta.json: records no sha256"),
    ],
    ids=["missing-history", "missing-meta", "broken-meta", "unlisted-file", "no-hashes"],
)
def test_a_missing_or_unlisted_file_is_named(run_copy, change, reason):
    root, run_dir = run_copy
    change(run_dir / CHECKPOINTS / "round_0002")
    with pytest.raises(CheckpointCorrupt, match=f"round_0002/{reason}.*Intact earlier rounds: 1;"):
        resume(root, run_dir)[1]()


def _drop_hashes(folder: Path) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    del meta["files"]
    (folder / META_FILE).write_text(json.dumps(meta))


def test_from_round_resumes_from_the_intact_round_and_moves_the_later_one_aside(run_copy):
    root, run_dir = run_copy
    checkpoints = run_dir / CHECKPOINTS
    write_nans(checkpoints / "round_0002" / STATE_FILE)
    corrupt = (checkpoints / "round_0002" / STATE_FILE).read_bytes()
    round_one = load_file(str(checkpoints / "round_0001" / STATE_FILE))

    grid, go = resume(root, run_dir, "federation.resume_from_round=1")
    history = go()
    rounds_sent = {m.content[protocol.CONFIG][protocol.SERVER_ROUND] for m in grid.sent}
    assert rounds_sent == {2, 3}
    first = protocol.record_to_state(grid.sent[0].content[protocol.ARRAYS])
    assert all((first[name].numpy() == round_one[name]).all() for name in round_one)
    (aside,) = [p for p in checkpoints.iterdir() if p.name.startswith(ABANDONED)]
    assert (aside / "round_0002" / STATE_FILE).read_bytes() == corrupt  # kept as it was, not deleted
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("round_")) == ["round_0002", "round_0003"]
    final = load_file(str(run_dir / FINAL_STATE))
    assert all(np.isfinite(value).all() for value in final.values())
    assert {r.round for r in history.rows} == {0, 1, 2, 3}
    meta = json.loads((checkpoints / "round_0003" / META_FILE).read_text())
    assert meta["resumed_from_round"] == 1

    # The same command again (a restart after a crash) continues that line: nothing more is moved aside.
    grid, go = resume(root, run_dir, "federation.resume_from_round=1", rounds=4)
    go()
    assert {m.content[protocol.CONFIG][protocol.SERVER_ROUND] for m in grid.sent} == {4}
    assert len([p for p in checkpoints.iterdir() if p.name.startswith(ABANDONED)]) == 1


def tiny_record(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, dtype=np.float32))})


def test_going_back_to_a_round_that_is_not_there_lists_the_rounds(tmp_path):
    checkpointer = Checkpointer(tmp_path, schema="s", keep=3)
    for server_round in (1, 2, 3):
        checkpointer.save(server_round, tiny_record(server_round), History())
    with pytest.raises(CheckpointError, match=r"no checkpoint of round 7 \(rounds: \[1, 2, 3\]\)"):
        checkpointer.resume(7)
    checkpointer.save(4, tiny_record(4), History())  # prunes round 1
    with pytest.raises(CheckpointError, match=r"no checkpoint of round 1 .*Intact rounds: 2, 3, 4;"):
        checkpointer.resume(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_0002", "round_0003", "round_0004"]


def test_a_second_resume_from_the_same_round_continues_after_the_older_rounds_were_pruned(tmp_path):
    first = Checkpointer(tmp_path, schema="s", keep=2)
    for server_round in (1, 2, 3):
        first.save(server_round, tiny_record(server_round), History())
    again = Checkpointer(tmp_path, schema="s", keep=2)
    assert again.resume(2).server_round == 2
    for server_round in (3, 4):  # round 2 is pruned after round 4
        again.save(server_round, tiny_record(10 + server_round), History())
    restarted = Checkpointer(tmp_path, schema="s", keep=2)
    resumed = restarted.resume(2)
    assert resumed.server_round == 4 and (resumed.arrays["w"].numpy() == 14).all()
    assert restarted.resumed_from == 2
    (aside,) = tmp_path.glob(f"{ABANDONED}*")
    assert [p.name for p in aside.iterdir()] == ["round_0003"]


def test_load_federated_state_refuses_nan_and_writes_nothing():
    model, _ = build_model(tiny_model(), 3, 0)
    before = federated_state(model)
    bad = {name: tensor.clone() for name, tensor in before.items()}
    names = sorted(bad)[:2]
    bad[names[0]].view(-1)[0] = float("nan")
    bad[names[1]].view(-1)[-1] = float("inf")
    with pytest.raises(NonFiniteState, match=f"2 of {len(bad)} tensors: {names[0]}, {names[1]}"):
        load_federated_state(model, bad)
    assert all(torch.equal(before[name], value) for name, value in federated_state(model).items())


def test_publishing_refuses_a_non_finite_final_state_naming_the_tensors(run_copy):
    _, run_dir = run_copy
    hit = write_nans(run_dir / FINAL_STATE, tensors=2, count=10)
    with pytest.raises(NonFiniteState, match=f"{run_dir / FINAL_STATE} \\(not published\\) .* 2 of") as error:
        publish_run(run_dir, variants=["fp32"])
    assert all(name in str(error.value) for name in hit)
    assert not (run_dir / MODEL_DIR).exists()


@pytest.mark.slow  # two fingpt-server processes: their imports alone took 40 s each on a busy 2-core machine
def test_fingpt_server_run_names_the_corrupt_file_in_one_line_before_starting_anything(run_copy):
    root, run_dir = run_copy
    write_nans(run_dir / CHECKPOINTS / "round_0002" / STATE_FILE)
    command = [sys.executable, "-m", "fingpt_federated.server.cli", "run", "--workdir", str(root / "op"), "--insecure"]
    run = {"capture_output": True, "text": True, "timeout": 120, "env": {**os.environ, "OMP_NUM_THREADS": "1"}}
    corrupt = subprocess.run([*command, "--run-dir", str(run_dir)], **run)
    assert corrupt.returncode == 1
    (line,) = [line for line in corrupt.stderr.splitlines() if line.startswith("fingpt-server: error:")]
    assert f"{run_dir}/checkpoints/round_0002/state.safetensors: sha256 differs" in line and "--from-round 1" in line
    assert "Traceback" not in corrupt.stderr
    assert not (root / "op" / "logs").exists()  # no SuperLink was started
    missing = subprocess.run([*command, "--run-dir", str(run_dir), "--from-round", "5"], **run)
    assert missing.returncode == 2 and "no checkpoint of round 5 (rounds: [1, 2])" in missing.stderr


DP = [
    "privacy=dp",
    "privacy.dp.logical_batch_size=16",
    "privacy.dp.physical_batch_size=8",
    "privacy.dp.accountant=rdp",
    "privacy.dp.planned_rounds=3",  # noise for 3 rounds in a 2-round run: room for one round trained again
]


def test_going_back_a_round_under_dp_keeps_the_privacy_spent_in_the_abandoned_round(tmp_path):
    """The banks' ledgers are not rolled back: a round trained again is charged again. (With the noise calibrated
    for exactly the run's rounds, the default, the budget has no room for it and the banks decline instead.)"""
    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", *DP)
    run_federation(grid, cfg, spec, tmp_path / "run")
    ledger = ledger_path(tmp_path / "data" / "bank_0" / "state", "run")
    after_two = PrivacyLedger.load(ledger).epsilon_spent()

    cfg, spec, grid = federation(tmp_path, "federation.rounds=2", "federation.resume_from_round=1", *DP)
    history = run_federation(grid, cfg, spec, tmp_path / "run")
    again = PrivacyLedger.load(ledger)
    assert [r["round"] for r in again.rounds] == ["1", "2", "2"]
    assert again.epsilon_spent() > after_two
    retrained = next(r for r in history.select("train") if r.round == 2 and r.bank == "bank_0")
    assert retrained.metrics["epsilon"] == pytest.approx(again.epsilon_spent(), abs=1e-9)
