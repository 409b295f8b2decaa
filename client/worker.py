"""A bank's long-lived worker: `python -m fingpt_federated.client.worker --socket PATH --node-config JSON`.

`fingpt-client start` runs one per bank (client/worker_supervisor.py), as the bank's own user and
under the process guard, so it ends with fingpt-client; it restarts the worker if it crashes. The
worker holds what a per-message ClientApp process would rebuild every time: torch, the model
built on the backbone (loaded once per run, cached by folder and content hash), the bank's
validated data, and the key material it opens (HE secret context, binding key) and its DP
ledger, which therefore stay with this process's owner.

It serves one message at a time on a Unix socket in a private directory (client/worker_channel.py):
the directory must already be 0700 and this user's, the socket is created 0600, and a connecting
process of another user is refused (SO_PEERCRED). The node config it works with is its own, given
by fingpt-client at start, not what a connecting process says; the run config travels with each
message. A malformed or failing message gets an error reply and the worker goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fingpt_federated.client import worker_channel
from fingpt_federated.client.worker_channel import ChannelError

RECEIVE_TIMEOUT_S = 300.0  # a request must arrive whole within this; the work itself has no limit
BACKLOG = 8
PEERCRED = struct.Struct("3i")  # pid, uid, gid
EXIT_UNSAFE = 2
TIMING_PREFIX = "fingpt-timing "  # one line per message on the worker's output; bench_deploy reads them


def bind_private(path: Path) -> socket.socket:
    """Listen on `path` inside a checked private directory; the socket file is created 0600.

    A stale socket file (a previous worker of this bank that crashed) is replaced; anything else
    at that path is refused.
    """
    worker_channel.check_private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ChannelError(f"{path} exists and is not a socket: refusing to replace it")
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(previous)
    os.chmod(path, 0o600)
    worker_channel.check_private_socket(path)
    server.listen(BACKLOG)
    return server


def peer_uid(conn: socket.socket) -> int:
    _pid, uid, _gid = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return int(uid)


class Worker:
    """Serves the bank's messages with `worker_task.handle` in this process."""

    def __init__(self, node_config: dict[str, Any]) -> None:
        from fingpt_federated.client import worker_task  # torch, the model code: imported once, here

        self.task = worker_task
        self.node_config = node_config
        worker_task.preload(node_config)

    def reply(
        self, header: dict[str, Any], body: bytes, steps: dict[str, float] | None = None
    ) -> tuple[dict[str, Any], bytes]:
        """The reply frame to one request frame; a failure becomes an error reply.

        `steps` gets the wall-clock times at which the body was decoded, handled and encoded.
        """
        steps = {} if steps is None else steps
        try:
            context = Context(
                run_id=int(header.get("run_id", 0)),
                node_id=int(header.get("node_id", 0)),
                node_config=dict(self.node_config),
                state=RecordDict(),
                run_config=dict(header.get("run_config") or {}),
            )
            message = worker_channel.decode_body(body)
            steps["decoded"] = time.time()
            content = self.task.handle(str(header.get("kind")), message, context)
            steps["handled"] = time.time()
            encoded = worker_channel.encode_body(content)
            steps["encoded"] = time.time()
            return {"status": worker_channel.STATUS_OK}, encoded
        except Exception as exc:  # the bank's failure of the round, reported to its ClientApp
            return {"status": worker_channel.STATUS_ERROR, "error": f"{type(exc).__name__}: {exc}"}, b""

    def serve_one(self, conn: socket.socket) -> None:
        if peer_uid(conn) != os.geteuid():
            return  # another user reached the socket: it gets nothing
        conn.settimeout(RECEIVE_TIMEOUT_S)
        try:
            header, body = worker_channel.recv_frame(conn)
        except (ChannelError, OSError) as exc:
            _send_quietly(conn, {"status": worker_channel.STATUS_ERROR, "error": f"bad request: {exc}"})
            return
        conn.settimeout(None)
        steps = {"received": time.time()}
        reply, content = self.reply(header, body, steps)
        _send_quietly(conn, reply, content)
        steps["sent"] = time.time()
        sent_by_app = header.get("timing")  # the ClientApp's process start and handler entry
        timing = {
            "kind": header.get("kind"),
            "node": header.get("node_id"),
            "status": reply["status"],
            **(sent_by_app if isinstance(sent_by_app, dict) else {}),
            **steps,
        }
        print(TIMING_PREFIX + json.dumps(timing, default=str), flush=True)

    def serve(self, server: socket.socket) -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                self.serve_one(conn)


def _send_quietly(conn: socket.socket, header: dict[str, Any], body: bytes = b"") -> None:
    """A ClientApp that went away (its SuperNode stopped it) does not end the worker."""
    try:
        worker_channel.send_frame(conn, header, body)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fingpt-client worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--node-config", required=True, help="the node config, a JSON object")
    args = parser.parse_args(argv)
    try:
        server = bind_private(args.socket)
    except (ChannelError, OSError) as exc:
        print(f"fingpt-client worker: error: {exc}", file=sys.stderr)
        return EXIT_UNSAFE
    worker = Worker(json.loads(args.node_config))
    print(f"worker ready on {args.socket} (pid {os.getpid()})", flush=True)
    with server:
        worker.serve(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
