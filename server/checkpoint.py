"""The global state and the metrics after every round, written atomically, verified when read back.

A checkpoint is a folder `round_NNNN/`: state.safetensors, history.json, server_state.safetensors when
the strategy keeps state of its own (FedAvgM's momentum), and meta.json, written last, which records
the sha256 of every other file. The folder is written under a temporary name and renamed into place,
so a server killed mid-write leaves either the previous checkpoint or the new one, never half of one.
The newest `keep` rounds are kept, and with them the round `pin` names in the history of each of them
(the best round so far, which publishing takes: server/best_round.py), whatever its age: a run resumed
from any kept round still finds its best round on disk.

Nothing read back is trusted: every file meta.json lists must be there with its recorded hash and no
other file may be, the tensors must parse and be finite, and the state schema must be the model's
(an adapter of another model is never loaded silently). A checkpoint that fails stops the run with
`CheckpointCorrupt`, which names the file and the intact earlier rounds. `resume(from_round=N)` goes
back to one of them: the rounds after N are moved to `abandoned-TIME/` beside them, never deleted, and
the rounds trained after that record it in their meta.json (`resumed_from_round`), so a restart with
the same setting continues them instead of going back again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log
from safetensors import SafetensorError
from safetensors.numpy import load_file, save, save_file

from fingpt_federated.model.state import NonFiniteState, check_finite
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.server.history import History

STATE_FILE = "state.safetensors"
HISTORY_FILE = "history.json"
META_FILE = "meta.json"
SERVER_STATE_FILE = "server_state.safetensors"
PREFIX = "round_"
ABANDONED = "abandoned-"
FILES = "files"  # meta.json: {file name: sha256}
RESUMED_FROM = "resumed_from_round"  # meta.json: the round this line of checkpoints went back to
_HASHED = (STATE_FILE, HISTORY_FILE, SERVER_STATE_FILE)


class CheckpointError(RuntimeError):
    """A run folder's checkpoints cannot be resumed as asked."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint in the run folder belongs to another model."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file is missing, altered, truncated, unlisted or holds non-finite values."""


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpointer:
    def __init__(
        self,
        folder: str | Path,
        schema: str | None,
        keep: int = 2,
        pin: Callable[[History], int | None] | None = None,
    ) -> None:
        """`schema`: the state schema hash of the model being trained (None: integrity checks only); `pin`: the
        round never pruned, out of the history saved (None: only the newest `keep`)."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder = Path(folder)
        self.schema = schema
        self.keep = keep
        self.pin = pin
        self.resumed_from: int | None = None  # recorded in the meta.json of every checkpoint saved

    def save(
        self,
        server_round: int,
        arrays: ArrayRecord,
        history: History,
        server_state: dict[str, np.ndarray] | None = None,
    ) -> Path:
        final = self.path(server_round)
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.folder))
        try:
            save_file(arrays_to_numpy(arrays), str(staging / STATE_FILE))
            if server_state:
                save_file(server_state, str(staging / SERVER_STATE_FILE))
            (staging / HISTORY_FILE).write_text(history.up_to(server_round).to_json(), encoding="utf-8")
            info: dict = {"round": server_round, "schema": self.schema, "saved_at": time.time()}
            info[FILES] = {path.name: file_sha256(path) for path in sorted(staging.iterdir())}
            if self.resumed_from is not None:
                info[RESUMED_FROM] = self.resumed_from
            (staging / META_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
            _fsync_folder(staging)
            if final.exists():  # never expected (resume moves later rounds aside), and never deleted
                self._set_aside([server_round])
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._prune(history)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint, verified, or None when the folder has none."""
        return self.check_resume(None)

    def resume(self, from_round: int | None = None) -> Checkpoint | None:
        """The checkpoint a run continues from, verified: the newest, or with `from_round` that round (or the
        newest trained after an earlier resume from it); the later rounds are then moved to abandoned-TIME/."""
        stale, checkpoint = self._resume_point(from_round)
        if stale:
            aside = self._set_aside(stale)
            log(WARNING, "Resuming from round %d: checkpoints of rounds %s moved to %s", from_round, stale, aside)
        if checkpoint is not None:
            self.resumed_from = from_round if from_round is not None else _resumed_from(checkpoint.meta)
        return checkpoint

    def check_resume(self, from_round: int | None = None) -> Checkpoint | None:
        """What `resume` would continue from, verified the same way; nothing is moved."""
        return self._resume_point(from_round)[1]

    def load(self, server_round: int) -> Checkpoint:
        """One round's checkpoint, verified; `CheckpointCorrupt` names the file and the intact earlier rounds."""
        try:
            checkpoint = self._read(server_round)
        except CheckpointCorrupt as error:
            raise CheckpointCorrupt(f"{error}. {self._way_back(server_round)}") from None
        self._check_schema(checkpoint)
        return checkpoint

    def intact_rounds(self, below: int | None = None) -> list[int]:
        """The rounds (before `below`) whose checkpoint passes every check but the schema's."""
        intact = []
        for server_round in self._rounds():
            if below is not None and server_round >= below:
                break
            try:
                self._read(server_round)
            except CheckpointCorrupt:
                continue
            intact.append(server_round)
        return intact

    def _resume_point(self, from_round: int | None) -> tuple[list[int], Checkpoint | None]:
        """(the rounds to move aside, the checkpoint to continue from)."""
        rounds = self._rounds()
        stale: list[int] = []
        if from_round is not None:
            later = [r for r in rounds if r > from_round]
            stale = [r for r in later if _resumed_from(self._meta_or_empty(r)) != from_round]
            if from_round not in rounds and (stale or not later):
                raise CheckpointError(
                    f"{self.folder} holds no checkpoint of round {from_round} (rounds: {rounds or 'none'}). "
                    + self._way_back(None)
                )
        remaining = [r for r in rounds if r not in stale]
        return stale, self.load(remaining[-1]) if remaining else None

    def _read(self, server_round: int) -> Checkpoint:
        folder = self.path(server_round)
        meta = _verified_meta(folder, server_round)
        state = _tensors(folder / STATE_FILE)
        server_state = _tensors(folder / SERVER_STATE_FILE) if SERVER_STATE_FILE in meta[FILES] else {}
        try:
            history = History.from_json((folder / HISTORY_FILE).read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointCorrupt(f"{folder / HISTORY_FILE}: not a readable history ({error})") from None
        return Checkpoint(server_round, numpy_to_arrays(state), history, meta, server_state)

    def _check_schema(self, checkpoint: Checkpoint) -> None:
        if self.schema is None:
            return
        recorded = str(checkpoint.meta.get("schema"))
        if recorded != self.schema:
            raise CheckpointMismatch(
                f"{self.path(checkpoint.server_round)} holds a state of schema {recorded[:12]}, the model has "
                f"{self.schema[:12]}: point the run at a new folder, or restore the model config it was trained with"
            )

    def _way_back(self, failed_round: int | None) -> str:
        """How to resume from an intact round (before `failed_round`), listing them."""
        intact = self.intact_rounds(below=failed_round)
        if not intact:
            return "No intact earlier checkpoint is left: start the run again in a new run folder"
        listed = ", ".join(str(r) for r in intact)
        n = intact[-1]
        which = "Intact rounds" if failed_round is None else "Intact earlier rounds"
        return (
            f"{which}: {listed}; resume from one with `fingpt-server run --from-round {n}` "
            f"or the override federation.resume_from_round={n} (fingpt-sim); the later rounds are moved to "
            f"{self.folder / ABANDONED}TIME/, not deleted"
        )

    def _meta_or_empty(self, server_round: int) -> dict:
        try:
            meta = json.loads((self.path(server_round) / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def _set_aside(self, rounds: list[int]) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.folder / f"{ABANDONED}{stamp}"
        number = 1
        while aside.exists():
            number += 1
            aside = self.folder / f"{ABANDONED}{stamp}-{number}"
        aside.mkdir()
        for server_round in rounds:
            os.rename(self.path(server_round), aside / self.path(server_round).name)
        return aside

    def path(self, server_round: int) -> Path:
        """The folder of a round's checkpoint."""
        return self.folder / f"{PREFIX}{server_round:04d}"

    def _rounds(self) -> list[int]:
        """Every `round_NNNN` folder: one without meta.json is a corrupt checkpoint, not an absent one."""
        if not self.folder.is_dir():
            return []
        found = []
        for entry in self.folder.iterdir():
            suffix = entry.name.removeprefix(PREFIX)
            if entry.is_dir() and entry.name.startswith(PREFIX) and suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def _prune(self, history: History) -> None:
        rounds = self._rounds()
        kept = rounds[-self.keep :]
        pin = self.pin
        pinned = {pin(history.up_to(r)) for r in kept} if pin is not None else set()
        for old in rounds[: -self.keep]:
            if old not in pinned:
                shutil.rmtree(self.path(old), ignore_errors=True)


def _resumed_from(meta: dict) -> int | None:
    value = meta.get(RESUMED_FROM)
    return value if isinstance(value, int) else None


def _verified_meta(folder: Path, server_round: int) -> dict:
    """meta.json of a checkpoint folder, once every file it lists has its recorded sha256 and no other file is there."""
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: missing (the checkpoint cannot be verified)") from None
    except (OSError, ValueError) as error:
        raise CheckpointCorrupt(f"{path}: not readable JSON ({error})") from None
    files = meta.get(FILES) if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise CheckpointCorrupt(f"{path}: records no sha256 of the checkpoint's files, so nothing can be verified")
    if meta.get("round") != server_round:
        raise CheckpointCorrupt(f"{path}: says round {meta.get('round')!r}, the folder is round {server_round}")
    for name in (STATE_FILE, HISTORY_FILE):
        if name not in files:
            raise CheckpointCorrupt(f"{path}: lists no {name}")
    unknown = sorted(set(files) - set(_HASHED))
    if unknown:
        raise CheckpointCorrupt(f"{path}: lists unexpected files {unknown}")
    unlisted = sorted(entry.name for entry in folder.iterdir() if entry.name not in files and entry.name != META_FILE)
    if unlisted:
        raise CheckpointCorrupt(f"{folder / unlisted[0]}: not listed in meta.json (added after the checkpoint)")
    for name, recorded in sorted(files.items()):
        if not (folder / name).is_file():
            raise CheckpointCorrupt(f"{folder / name}: missing")
        if file_sha256(folder / name) != recorded:
            raise CheckpointCorrupt(
                f"{folder / name}: sha256 differs from the one meta.json recorded (changed or truncated after it "
                "was written)"
            )
    return meta


def _tensors(path: Path) -> dict[str, np.ndarray]:
    """A checkpoint's safetensors file, every float finite."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointCorrupt(f"{path}: not a readable safetensors file ({error})") from None
    try:
        check_finite(tensors, str(path))
    except NonFiniteState as error:
        raise CheckpointCorrupt(str(error)) from None
    return tensors


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
