"""The local channel between a bank's thin ClientApp and its long-lived worker: a Unix domain socket.

Flower 1.41 starts a fresh `flwr-clientapp` process for every message, so the ClientApp cannot
hold torch, the backbone or the bank's data between rounds; the worker (client/worker.py) does.
The ClientApp hands each message to it over this channel and returns its reply.

Who may open it: only the bank's own user. The socket lives in a directory of mode 0700 and is
itself 0600, both owned by that user; either side refuses a directory or socket that is a symlink,
belongs to another user or grants anything to group or others (`check_private_dir`,
`check_private_socket`), and the worker also checks the connecting process's user (SO_PEERCRED).

The format, versioned and length-prefixed, never pickled: a fixed prefix (magic `FGWK`, format
version, header length, body length), a UTF-8 JSON header, then the body: Flower's own protobuf
serialisation of a RecordDict (arrays inside it are numpy `.npy` bytes loaded with
allow_pickle=False by Flower). Sizes are checked against limits before anything is read.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

MAGIC = b"FGWK"
VERSION = 1
PREFIX = struct.Struct(">4sHIQ")  # magic, version, header length, body length
MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 31  # protobuf's own limit on one serialised message is 2 GiB
SOCKET_NAME = "worker.sock"
NODE_WORKER_SOCKET = "worker-socket"  # the node config key that sends messages to the worker
CONNECT_WAIT_S = 300.0  # a restarting worker imports torch and reloads the bank's data first
CONNECT_RETRY_S = 0.2
STATUS_OK = "ok"
STATUS_ERROR = "error"


class ChannelError(RuntimeError):
    """The channel is unsafe, unreachable, or a frame on it is malformed."""


class WorkerFailed(RuntimeError):
    """The worker ran the message and it failed there: the bank's failure of the round."""


def check_private_dir(path: Path) -> None:
    """`path` is a real directory of this user, closed to group and others (0700 or stricter)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ChannelError(f"worker socket directory {path} does not exist") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ChannelError(f"worker socket directory {path} is not a directory (a symlink or a file)")
    _check_owner_only(path, info, "directory")


def check_private_socket(path: Path) -> None:
    """`path` is a Unix socket of this user inside a private directory, closed to group and others."""
    check_private_dir(path.parent)
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode):
        raise ChannelError(f"worker socket {path} is not a socket")
    _check_owner_only(path, info, "socket")


def _check_owner_only(path: Path, info: os.stat_result, what: str) -> None:
    if info.st_uid != os.geteuid():
        raise ChannelError(f"worker {what} {path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()})")
    if info.st_mode & 0o077:
        raise ChannelError(
            f"worker {what} {path} has mode {stat.S_IMODE(info.st_mode):04o}: group or others may open it "
            f"(needs {'0700' if what == 'directory' else '0600'})"
        )


def process_started() -> float | None:
    """When this process started, wall clock (Linux /proc, 10 ms resolution); None elsewhere.

    The ClientApp sends it with each message so that the worker's timing line shows what a fresh
    `flwr-clientapp` process costs before it reaches the app (start, imports, pulling the message).
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat(5)
    return time.time() - (uptime - started_after_boot)


def encode_body(content: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(content).SerializeToString())


def decode_body(body: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(body)
    return recorddict_from_proto(proto)


def send_frame(sock: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    head = json.dumps(header, sort_keys=True).encode()
    if len(head) > MAX_HEADER_BYTES or len(body) > MAX_BODY_BYTES:
        raise ChannelError(f"frame too large: header {len(head)} bytes, body {len(body)} bytes")
    sock.sendall(PREFIX.pack(MAGIC, VERSION, len(head), len(body)) + head)
    if body:  # with no body the peer may already have read the frame, answered and closed
        sock.sendall(body)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """One frame: its header (a JSON object) and body; ChannelError for anything else."""
    magic, version, head_len, body_len = PREFIX.unpack(_recv_exactly(sock, PREFIX.size))
    if magic != MAGIC:
        raise ChannelError(f"not a worker frame (magic {magic!r})")
    if version != VERSION:
        raise ChannelError(f"worker frame version {version}, this side speaks {VERSION}")
    if head_len > MAX_HEADER_BYTES or body_len > MAX_BODY_BYTES:
        raise ChannelError(f"frame too large: header {head_len} bytes, body {body_len} bytes")
    try:
        header = json.loads(_recv_exactly(sock, head_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChannelError(f"worker frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ChannelError("worker frame header is not a JSON object")
    return header, _recv_exactly(sock, body_len)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ChannelError(f"the other side closed the channel {size - left} bytes into a {size}-byte part")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def connect(path: Path, wait_s: float = CONNECT_WAIT_S) -> socket.socket:
    """A connection to the worker at `path`, checked private first; waits for a (re)starting worker.

    Only a missing socket or one nobody listens on is waited for (the worker restarts); a missing
    directory, or an unsafe directory or socket, is refused at once: waiting would not fix it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_private_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except OSError:
                sock.close()
                raise
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise ChannelError(
                    f"the bank's worker at {path} did not answer within {wait_s:.0f}s ({exc.strerror}): "
                    "is fingpt-client running with --worker?"
                ) from None
            time.sleep(CONNECT_RETRY_S)


def request(
    path: Path, kind: str, content: RecordDict, meta: dict[str, Any], wait_s: float = CONNECT_WAIT_S
) -> RecordDict:
    """Send one message (`kind`: train or evaluate) to the worker; its reply content.

    `meta` travels in the header (run id, node id, run config). A failure inside the worker comes
    back as WorkerFailed with the worker's one-line reason.
    """
    with connect(path, wait_s) as sock:
        send_frame(sock, {"kind": kind, **meta}, encode_body(content))
        header, body = recv_frame(sock)
    if header.get("status") == STATUS_OK:
        return decode_body(body)
    raise WorkerFailed(str(header.get("error", "the worker replied without a status")))
