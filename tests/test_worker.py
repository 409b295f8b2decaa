"""The bank's long-lived worker: the thin ClientApp, the private socket, the frame format, a real
worker that trains a tiny model, and its restart after a crash."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from federation_helpers import CLASSES, client_message, node_context, tiny_model, trained, write_bank
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fingpt_federated.client import worker_channel
from fingpt_federated.client.app import app as client_app
from fingpt_federated.client.worker import TIMING_PREFIX, bind_private
from fingpt_federated.client.worker import main as worker_main
from fingpt_federated.client.worker_channel import ChannelError, WorkerFailed
from fingpt_federated.client.worker_supervisor import WorkerSupervisor
from fingpt_federated.federation import protocol
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state


def test_the_clientapp_module_imports_no_torch_or_transformers():
    heavy = "('torch', 'transformers', 'peft')"
    code = f"import sys, fingpt_federated.client.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_frame_round_trips_a_recorddict_with_arrays_metrics_and_bytes():
    import numpy as np

    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))}),
            "metrics": MetricRecord({"num-examples": 3, "loss": 0.5}),
            "config": ConfigRecord({"blob": b"\x00\x01", "name": "bank"}),
        }
    )
    left, right = socket.socketpair()
    with left, right:
        worker_channel.send_frame(left, {"kind": "train"}, worker_channel.encode_body(content))
        header, body = worker_channel.recv_frame(right)
    back = worker_channel.decode_body(body)
    assert header == {"kind": "train"}
    assert back["arrays"]["w"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back["metrics"]["loss"] == 0.5 and back["config"]["blob"] == b"\x00\x01"


@pytest.mark.parametrize(
    "prefix, message",
    [
        (struct.pack(">4sHIQ", b"PICK", 1, 2, 0) + b"{}", "not a worker frame"),
        (struct.pack(">4sHIQ", b"FGWK", 9, 2, 0) + b"{}", "version 9"),
        (struct.pack(">4sHIQ", b"FGWK", 1, 1 << 30, 0), "frame too large"),
        (struct.pack(">4sHIQ", b"FGWK", 1, 2, 1 << 40), "frame too large"),
        (struct.pack(">4sHIQ", b"FGWK", 1, 5, 0) + b"[1,2]", "not a JSON object"),
        (struct.pack(">4sHIQ", b"FGWK", 1, 10, 0) + b"{}", "closed the channel"),
    ],
)
def test_a_malformed_frame_is_refused_before_its_body_is_read(prefix, message):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(prefix)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError, match=message):
            worker_channel.recv_frame(right)


def private_dir(tmp_path: Path, mode: int = 0o700) -> Path:
    folder = tmp_path / "sock"
    folder.mkdir()
    os.chmod(folder, mode)
    return folder


def test_the_socket_is_0600_in_a_0700_folder_and_a_wider_folder_or_socket_is_refused(tmp_path):
    folder = private_dir(tmp_path)
    with bind_private(folder / "worker.sock") as server:
        assert oct(os.stat(folder / "worker.sock").st_mode & 0o777) == "0o600"
        worker_channel.connect(folder / "worker.sock", wait_s=1).close()
        os.chmod(folder / "worker.sock", 0o666)
        with pytest.raises(ChannelError, match="mode 0666: group or others"):
            worker_channel.connect(folder / "worker.sock", wait_s=1)
        os.chmod(folder / "worker.sock", 0o600)
        os.chmod(folder, 0o750)
        with pytest.raises(ChannelError, match="mode 0750"):
            worker_channel.connect(folder / "worker.sock", wait_s=1)
        server.close()


def test_a_wrong_path_a_symlink_or_a_plain_file_is_refused_at_once(tmp_path):
    with pytest.raises(ChannelError, match="does not exist"):
        worker_channel.connect(tmp_path / "nowhere" / "worker.sock", wait_s=30)
    folder = private_dir(tmp_path)
    (folder / "worker.sock").write_text("not a socket")
    os.chmod(folder / "worker.sock", 0o600)
    with pytest.raises(ChannelError, match="is not a socket"):
        worker_channel.connect(folder / "worker.sock", wait_s=1)
    (tmp_path / "link").symlink_to(folder)
    with pytest.raises(ChannelError, match="is not a directory"):
        worker_channel.check_private_dir(tmp_path / "link")
    with pytest.raises(ChannelError, match="not a socket: refusing to replace it"):
        bind_private(folder / "worker.sock")


def test_the_worker_will_not_listen_in_a_folder_others_can_open(tmp_path, capsys):
    folder = private_dir(tmp_path, 0o755)
    assert worker_main(["--socket", str(folder / "worker.sock"), "--node-config", "{}"]) == 2
    assert "mode 0755: group or others may open it" in capsys.readouterr().err
    assert not (folder / "worker.sock").exists()


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return write_bank(tmp_path_factory.mktemp("bank") / "bank_w", "bank_w", [0.6, 0.2, 0.2], seed=3)


@pytest.fixture(scope="module")
def initial():
    model, _ = build_model(tiny_model(), len(CLASSES), 0)
    return federated_state(model)


def test_the_clientapp_reports_a_missing_worker_as_the_banks_failure(tmp_path, initial):
    missing = tmp_path / "gone" / "worker.sock"
    with pytest.raises(ChannelError, match="does not exist"):
        client_app(client_message(initial), node_context({worker_channel.NODE_WORKER_SOCKET: str(missing)}))


def worker_process(supervisor: WorkerSupervisor) -> psutil.Process:
    guard = psutil.Process(supervisor.pid)
    (worker,) = guard.children()
    return worker


@pytest.mark.slow
def test_a_supervised_worker_trains_loads_the_backbone_once_and_is_restarted_after_a_kill(
    bank, initial, tmp_path, capfd
):
    node = {protocol.NODE_DATA_PATH: str(bank), protocol.NODE_STATE_DIR: str(tmp_path / "state")}
    with WorkerSupervisor(node, socket_dir=tmp_path) as supervisor:
        via_worker = node_context({worker_channel.NODE_WORKER_SOCKET: str(supervisor.socket_path)})
        loads = []
        for server_round in (1, 2):
            state, metrics = trained(client_app(client_message(initial, server_round=server_round), via_worker))
            loads.append(metrics["backbone_loads"])
            assert set(state) == set(initial)
        assert loads == [1, 0]  # the backbone stays in the worker between messages
        out, deadline = "", time.monotonic() + 10  # the worker prints a message's line after its reply has left
        while out.count(TIMING_PREFIX) < 2 and time.monotonic() < deadline:
            out += capfd.readouterr().out
            time.sleep(0.05)
        timings = [line for line in out.splitlines() if line.startswith(TIMING_PREFIX)]
        assert len(timings) == 2  # one line per message, in order: the ClientApp's times, then the worker's
        timing = json.loads(timings[1].removeprefix(TIMING_PREFIX))
        assert (timing["kind"], timing["status"], timing["node"]) == ("train", "ok", 1)
        steps = ["process", "handler", "received", "decoded", "handled", "encoded", "sent"]
        assert [timing[step] for step in steps] == sorted(timing[step] for step in steps)
        first = worker_process(supervisor)
        assert oct(os.stat(supervisor.socket_dir).st_mode & 0o777) == "0o700"
        first.kill()
        first.wait(timeout=30)
        _, metrics = trained(client_app(client_message(initial, server_round=3), via_worker))
        assert metrics["backbone_loads"] == 1 and supervisor.restarts == 1
        assert worker_process(supervisor).pid != first.pid
        with pytest.raises(WorkerFailed, match="differs from the announced"):
            client_app(client_message(initial, state_hash="0" * 64), via_worker)  # the worker goes on
        trained(client_app(client_message(initial, server_round=4), via_worker))
        tree = [psutil.Process(supervisor.pid), *psutil.Process(supervisor.pid).children(recursive=True)]
        folder = supervisor.socket_dir
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    assert not folder.exists()


def test_a_worker_error_comes_back_as_one_line(tmp_path):
    folder = private_dir(tmp_path)
    server = bind_private(folder / "worker.sock")

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            worker_channel.recv_frame(conn)
            worker_channel.send_frame(conn, {"status": "error", "error": "ValueError: bank x has no rows"})

    thread = threading.Thread(target=answer)
    thread.start()
    with server, pytest.raises(WorkerFailed, match="ValueError: bank x has no rows"):
        worker_channel.request(folder / "worker.sock", "train", RecordDict(), {"run_id": 1})
    thread.join()
