"""A bounded `fingpt-infer serve` under abusive requests: time to answer or refuse, ordinary latency, memory.

    python -m fingpt_federated.simulations.bench_service [--workdir DIR] [--threads 1] [--ordinary-seconds 20]
                                      [--out bench.json] [-- SERVE OPTIONS...]

A tiny hybrid model (tiny encoder, text + a 2-feature series) is trained for a few steps on the
synthetic news of data/synthetic.py and published, then served by a real `fingpt-infer serve`
process on a free loopback port (default limits unless SERVE OPTIONS are given; cache off). The
scenarios, each with a client sending ordinary requests (one short text, an 8-step series,
explanation on) one after another the whole time:
- idle: ordinary requests alone (their latency without load);
- the request of issue 24's finding 4 (256 records of 20,000 characters, 256-step series,
  mc_samples 32), alone and six at once;
- the largest request the default limits accept (infer.limits.Limits: 32 records of 4,000
  characters, 256-step series, mc_samples 8, explanation on), alone and six at once.
For each: the status and seconds of every abusive request, the ordinary requests' p50/p99 and
statuses. The server's memory growth is its peak resident set (VmHWM) minus its resident set
after warm-up. The server is stopped at the end (SIGTERM, then SIGKILL), whatever happens.
`--workdir` keeps the published model and reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fingpt_federated.client.training import train_local
from fingpt_federated.conf import compose_config
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import BankData, save_bank
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.synthetic import SENTIMENTS, generate_news
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.infer.limits import Limits
from fingpt_federated.model.build import build_model
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.server.history import History
from fingpt_federated.server.publish import publish

FEATURES = ["price", "volume"]
WORDS = "acme bank shares surged beat profits plunged losses missed held meeting quarterly results".split()
FINDING = {"records": 256, "chars": 20_000, "steps": 256, "mc_samples": 32}
DEFAULTS = Limits()
LARGEST_ACCEPTED = {
    "records": DEFAULTS.max_records,
    "chars": DEFAULTS.max_text_chars,
    "steps": DEFAULTS.max_series_steps,
    "mc_samples": DEFAULTS.max_mc_samples,
}
CONCURRENT = 6


def news_with_series(seed: int = 0) -> BankDataset:
    """Synthetic news, each with an 8-step noise series of FEATURES (the service bench needs both inputs)."""
    frame = generate_news(2, 200, seed)
    rng = np.random.default_rng(seed)
    return BankDataset(
        texts=frame["text"].tolist(),
        series=rng.lognormal(3, 1, (len(frame), 8, len(FEATURES))).astype(np.float32),
        mask=np.ones((len(frame), 8), dtype=bool),
        labels=frame["sentiment"].map(SENTIMENTS.index).to_numpy(),
        class_names=list(SENTIMENTS),
        feature_names=list(FEATURES),
    )


def publish_tiny_hybrid(root: Path, steps: int = 20) -> Path:
    """The tiny hybrid model published under root/model (reused when already there)."""
    if (root / "model" / "model_card.json").is_file():
        return root / "model"
    cfg = compose_config(["model=tiny_encoder", "federation.rounds=1"])
    data = news_with_series()
    model, tokenizer = build_model(config_dict(cfg.model), len(SENTIMENTS), len(FEATURES))
    train_cfg = TrainConfig.from_mapping({**config_dict(cfg.model.train, resolve=False), "progress": False})
    train_local(model, tokenizer, data, train_cfg, max_steps=steps)
    test_dir = save_bank(BankData("test", data.subset(range(100)), None), root / "test")
    spec = FederationSpec(list(SENTIMENTS), len(FEATURES), str(test_dir))
    publish(
        federated_state(model),
        cfg,
        spec,
        History(),
        root / "model",
        ["fp32"],
        run="bench_service",
        state_source="a centrally trained state (benchmark)",
    )
    return root / "model"


def request_body(records: int, chars: int, steps: int, mc_samples: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    batch = []
    for _ in range(records):
        text = " ".join(rng.choice(WORDS) for _ in range(chars // 5 + 1))[:chars]
        series = [[round(rng.uniform(90, 110), 2), round(rng.uniform(1e3, 3e3), 1)] for _ in range(steps)]
        batch.append({"text": text, "series": series})
    return json.dumps({"records": batch, "mc_samples": mc_samples, "explain": True}).encode()


ORDINARY = json.dumps({"text": "acme shares surged after record profits", "series": [[100.0, 2000.0]] * 8}).encode()
JSON = {"content-type": "application/json"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of a process, in KiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


@contextmanager
def served(model: Path, workdir: Path, threads: int, options: list[str]) -> Iterator[tuple[str, int]]:
    """A `fingpt-infer serve` process on a free loopback port: (base URL, pid); stopped on exit."""
    port = free_port()
    command = [sys.executable, "-m", "fingpt_federated.infer.cli", "serve", str(model), "--port", str(port)]
    command += ["--cache-size", "0", "--audit-log", str(workdir / "audit.jsonl"), *options]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    log = (workdir / "serve.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fingpt-infer serve did not start; see {workdir / 'serve.log'}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, server.pid
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


def post(url: str, body: bytes, timeout: float = 600) -> tuple[int, float]:
    """(status, seconds) of one POST /predict on its own connection; a dropped connection is status 0."""
    started = time.perf_counter()
    try:
        status = httpx.post(url + "/predict", content=body, headers=JSON, timeout=timeout).status_code
    except httpx.TransportError:
        status = 0
    return status, time.perf_counter() - started


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def scenario(url: str, abusive: bytes | None, copies: int, ordinary_seconds: float) -> dict[str, Any]:
    """`copies` abusive requests at once while ordinary ones run back to back (for at least ordinary_seconds)."""
    stop = threading.Event()
    ordinary: list[tuple[int, float]] = []

    def ordinary_client() -> None:
        while not stop.is_set():
            ordinary.append(post(url, ORDINARY))

    client = threading.Thread(target=ordinary_client)
    client.start()
    started = time.perf_counter()
    try:
        if abusive is None:
            time.sleep(ordinary_seconds)
            heavy: list[tuple[int, float]] = []
        else:
            with ThreadPoolExecutor(copies) as pool:
                heavy = list(pool.map(lambda _: post(url, abusive), range(copies)))
            time.sleep(max(0.0, ordinary_seconds - (time.perf_counter() - started)))
    finally:
        stop.set()
        client.join()
    answered = [seconds * 1000 for status, seconds in ordinary if status == 200]
    return {
        "abusive": [{"status": status, "seconds": round(seconds, 2)} for status, seconds in heavy],
        "ordinary_statuses": dict(Counter(str(status) for status, _ in ordinary)),
        "ordinary_p50_ms": percentile(answered, 50) if answered else None,
        "ordinary_p99_ms": percentile(answered, 99) if answered else None,
        "ordinary_max_ms": max(answered) if answered else None,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = publish_tiny_hybrid(workdir)
    finding, largest = request_body(**FINDING), request_body(**LARGEST_ACCEPTED)
    results: dict[str, Any] = {
        "body_bytes": {"finding": len(finding), "largest_accepted": len(largest)},
        "serve_options": args.serve_options,
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg()[0],
    }
    with served(model, workdir, args.threads, args.serve_options) as (url, pid):
        for _ in range(5):
            post(url, ORDINARY)
        baseline = memory_kib(pid, "VmRSS")
        plan = [
            ("idle", None, 0),
            ("finding x1", finding, 1),
            ("finding x6", finding, CONCURRENT),
            ("largest accepted x1", largest, 1),
            ("largest accepted x6", largest, CONCURRENT),
        ]
        for name, body, copies in plan:
            results[name] = scenario(url, body, copies, args.ordinary_seconds)
            results[name]["server_peak_growth_mib"] = round((memory_kib(pid, "VmHWM") - baseline) / 1024, 1)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
        results["server_rss_after_warmup_mib"] = round(baseline / 1024, 1)
    results["load_average_after"] = os.getloadavg()[0]
    return results


def print_summary(results: dict[str, Any]) -> None:
    print(f"\nserver RSS after warm-up {results['server_rss_after_warmup_mib']} MiB; bodies {results['body_bytes']}")
    load = results["load_average_before"], results["load_average_after"]
    print(f"{results['cpus']} CPUs, 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after (other work)")
    columns = ("scenario", 22), ("abusive (status: seconds)", 52), ("ordinary p50/p99/max ms", 28), ("ordinary", 22)
    print("".join(f"{name:<{width}}" for name, width in columns) + "peak +MiB")
    for name in ("idle", "finding x1", "finding x6", "largest accepted x1", "largest accepted x6"):
        r = results[name]
        abusive = ", ".join(f"{a['status']}: {a['seconds']:.2f}" for a in r["abusive"]) or "-"
        latency = "/".join(f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("ordinary_p50_ms", "ordinary_p99_ms"))
        latency += f"/{r['ordinary_max_ms']:.0f}" if r["ordinary_max_ms"] is not None else ""
        statuses = " ".join(f"{s}x{n}" for s, n in r["ordinary_statuses"].items())
        print(f"{name:<22}{abusive:<52}{latency:<28}{statuses:<22}{r['server_peak_growth_mib']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the published model here (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server (default 1)")
    parser.add_argument("--ordinary-seconds", type=float, default=10.0, help="least time of each scenario")
    parser.add_argument("--out", type=Path, help="the figures as JSON")
    parser.add_argument("serve_options", nargs="*", help="options for fingpt-infer serve (after --)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-service-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(args, workdir)
    print_summary(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
