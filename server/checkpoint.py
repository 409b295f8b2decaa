"""The global state and the metrics after every round, written atomically, and resumed from.

A checkpoint is a folder `round_NNNN/` (state.safetensors, history.json, meta.json, and
server_state.safetensors when the strategy keeps state of its own, e.g. FedAvgM's momentum). It is
written under a temporary name and renamed into place, so a server killed mid-write leaves
either the previous checkpoint or the new one, never half of one. The last `keep` rounds are
kept. Resuming refuses a checkpoint whose state schema differs from the model being trained:
an adapter of another model must never be loaded silently.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save, save_file

from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.server.history import History

STATE_FILE = "state.safetensors"
HISTORY_FILE = "history.json"
META_FILE = "meta.json"
SERVER_STATE_FILE = "server_state.safetensors"
PREFIX = "round_"


class CheckpointMismatch(RuntimeError):
    """The checkpoint in the run folder belongs to another model."""


@dataclass(frozen=True)
class Checkpoint:
    server_round: int
    arrays: ArrayRecord
    history: History
    meta: dict
    server_state: dict[str, np.ndarray] = field(default_factory=dict)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(arrays[name].numpy()) for name in sorted(arrays)}


def numpy_to_arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(tensors[name]) for name in sorted(tensors)})


def save_state(arrays: ArrayRecord, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """The federated state as safetensors (atomic), names sorted as everywhere else."""
    atomic_write_bytes(path, save(arrays_to_numpy(arrays), metadata=metadata))
    return path


class Checkpointer:
    def __init__(self, folder: str | Path, schema: str, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.schema = schema
        self.keep = keep

    def save(
        self,
        server_round: int,
        arrays: ArrayRecord,
        history: History,
        server_state: dict[str, np.ndarray] | None = None,
    ) -> Path:
        final = self.folder / f"{PREFIX}{server_round:04d}"
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.folder))
        try:
            save_file(arrays_to_numpy(arrays), str(staging / STATE_FILE))
            if server_state:
                save_file(server_state, str(staging / SERVER_STATE_FILE))
            (staging / HISTORY_FILE).write_text(history.up_to(server_round).to_json(), encoding="utf-8")
            info = {"round": server_round, "schema": self.schema, "saved_at": time.time()}
            (staging / META_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
            _fsync_folder(staging)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._prune()
        return final

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None when the folder has none."""
        rounds = self._rounds()
        if not rounds:
            return None
        folder = self.folder / f"{PREFIX}{rounds[-1]:04d}"
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if meta.get("schema") != self.schema:
            raise CheckpointMismatch(
                f"{folder} holds a state of schema {str(meta.get('schema'))[:12]}, the model has {self.schema[:12]}: "
                "point the run at a new folder, or restore the model config it was trained with"
            )
        arrays = numpy_to_arrays(load_file(str(folder / STATE_FILE)))
        history = History.from_json((folder / HISTORY_FILE).read_text(encoding="utf-8"))
        extra = folder / SERVER_STATE_FILE
        server_state = load_file(str(extra)) if extra.is_file() else {}
        return Checkpoint(int(meta["round"]), arrays, history, meta, server_state)

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            suffix = entry.name.removeprefix(PREFIX)
            if entry.is_dir() and entry.name.startswith(PREFIX) and suffix.isdigit() and (entry / META_FILE).is_file():
                found.append(int(suffix))
        return sorted(found)

    def _prune(self) -> None:
        for old in self._rounds()[: -self.keep]:
            shutil.rmtree(self.folder / f"{PREFIX}{old:04d}", ignore_errors=True)


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
