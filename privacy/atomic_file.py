"""Replace a file so that a reader (or a restart after a crash) sees the old or the new bytes, never a mix.

The bytes go to a temporary file beside the target (same file system, so the rename is atomic),
are flushed and fsync'ed, then `os.replace`d over the target, and the folder is fsync'ed so the
rename itself survives a power cut. A crash at any point leaves the previous file intact; at
worst a stray `.tmp` file remains, which readers ignore and the next write does not reuse.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

OWNER_ONLY = 0o600


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int = OWNER_ONLY) -> None:
    """Write `data` to `path` atomically and durably (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def write_new_owner_only(path: str | Path, data: bytes, *, overwrite: bool, what: str) -> Path:
    """Create a file that is owner-only from its first byte (no window where others may read it).

    Refuses to replace an existing file unless `overwrite`, naming `what` it would have replaced:
    losing a key or secret context by accident locks a bank out of the federation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        path.unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; refusing to {what}") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, OWNER_ONLY)  # the umask may have removed bits, never added any; make it exact
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
