"""Inference cost of each published variant: latency, throughput, bytes and accuracy (CPU by default).

    python -m fingpt_federated.simulations.bench_infer [--model minilm] [--steps 40] [--seconds 15] [--threads 1]
                                      [--workdir DIR] [--out bench.json]

A model is trained for `--steps` steps on the synthetic news of data/synthetic.py (text
only: `data.synthetic.generate_news`), published with every variant through
server.publish.publish, then each variant is measured:
- single request, in process: one record through `Predictor.predict` (tokenisation included,
  no explanation), p50 / p99 of wall time;
- single request over HTTP: POST /predict to `fingpt-infer serve`'s app on a real uvicorn on a
  loopback port, the cache off, audit log on;
- batch of 32 in process: records per second;
- bytes of the variant's weights against fp32 (from the model card), and accuracy on a held-out
  set of the same synthetic news.
Each latency is measured until `--seconds` or `--requests` is reached (at least 5 samples), so
slow variants (bitsandbytes on a CPU) get fewer samples: the table says how many.
`--threads` is torch's intra-op threads (default 1: on a small shared machine a second OpenMP
thread waiting at every barrier for a descheduled partner made one request 30x slower, measured).
`--workdir` keeps the trained, published model and reuses it on the next run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn
from rich.console import Console
from rich.table import Table

from fingpt_federated.client.training import train_local
from fingpt_federated.conf import compose_config
from fingpt_federated.config_dicts import config_dict
from fingpt_federated.data.bank_data import BankData, save_bank
from fingpt_federated.data.records import BankDataset
from fingpt_federated.data.synthetic import SENTIMENTS, generate_news
from fingpt_federated.federation.federation_spec import FederationSpec
from fingpt_federated.infer.loading import open_model
from fingpt_federated.infer.predictor import Predictor
from fingpt_federated.infer.service import PredictionService
from fingpt_federated.infer.web import create_app
from fingpt_federated.model.build import build_model
from fingpt_federated.model.quantize import VARIANTS
from fingpt_federated.model.state import federated_state
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.audit import AuditLog
from fingpt_federated.server.history import History
from fingpt_federated.server.publish import publish

BATCH = 32
WARMUP = 3


def news_sets(seed: int = 0) -> tuple[BankDataset, BankDataset]:
    """(train, test) of synthetic news: 5 banks, the last 300 rows held out."""
    frame = generate_news(5, 400, seed).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    data = BankDataset(
        texts=frame["text"].tolist(),
        series=None,
        mask=None,
        labels=frame["sentiment"].map(SENTIMENTS.index).to_numpy(),
        class_names=list(SENTIMENTS),
    )
    return data.subset(range(len(data) - 300)), data.subset(range(len(data) - 300, len(data)))


def train_and_publish(model_name: str, steps: int, root: Path) -> tuple[Path, BankDataset]:
    """The published model under `root` (trained and published unless already there), and the test set."""
    if (root / "model" / "model_card.json").is_file():
        return root / "model", news_sets()[1]
    cfg = compose_config([f"model={model_name}", "federation.rounds=1"])
    train, test = news_sets()
    model, tokenizer = build_model(config_dict(cfg.model), len(SENTIMENTS), 0)
    train_cfg = TrainConfig.from_mapping(
        {**config_dict(cfg.model.train, resolve=False), "progress": False, "epochs": 5}
    )
    started = time.perf_counter()
    train_local(model, tokenizer, train, train_cfg, max_steps=steps)
    print(f"trained {steps} steps in {time.perf_counter() - started:.0f} s")
    test_dir = save_bank(BankData("test", test, None), root / "test")
    spec = FederationSpec(list(SENTIMENTS), 0, str(test_dir))
    started = time.perf_counter()
    publish(
        federated_state(model),
        cfg,
        spec,
        History(),
        root / "model",
        VARIANTS,
        run="bench_infer",
        state_source="a centrally trained state (benchmark)",
    )
    print(f"published {len(VARIANTS)} variants in {time.perf_counter() - started:.0f} s")
    return root / "model", test


def timed(call: Callable[[], Any], seconds: float, requests: int) -> list[float]:
    """Wall times (ms) of `call` after warm-up calls, until `requests` or `seconds` (at least 5 samples)."""
    for _ in range(WARMUP):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < requests and (len(times) < 5 or time.perf_counter() < deadline):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentile(times: list[float], q: int) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] if len(times) > 1 else times[0]


def over_http(service: PredictionService, record: dict[str, Any], seconds: float, requests: int) -> list[float]:
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            return timed(
                lambda: http.post("/predict", json={**record, "explain": False}).raise_for_status(), seconds, requests
            )
    finally:
        server.should_exit = True
        thread.join()


def measure(folder: Path, variant: str, test: BankDataset, args: argparse.Namespace, audit: Path) -> dict[str, Any]:
    published, card = open_model(folder, variant)
    predictor = Predictor(published, batch_size=BATCH)
    one, batch = test.subset([0]), test.subset(range(BATCH))
    single = timed(lambda: predictor.predict(one, explain=False), args.seconds, args.requests)
    started, done = time.perf_counter(), 0
    while done < 3 * BATCH or time.perf_counter() - started < args.seconds / 3:
        predictor.predict(batch, explain=False)
        done += BATCH
    throughput = done / (time.perf_counter() - started)
    predictions = predictor.predict(test, explain=False)
    accuracy = sum(p.label == test.class_names[y] for p, y in zip(predictions, test.labels, strict=True)) / len(test)
    service = PredictionService(predictor, card, AuditLog(audit), cache_size=0)
    assert test.texts is not None  # news_sets: synthetic news, text only
    http = over_http(service, {"text": test.texts[0]}, args.seconds, args.requests)
    info = card["variants"][variant]
    return {
        "variant": variant,
        "device": str(published.device),
        "p50_ms": percentile(single, 50),
        "p99_ms": percentile(single, 99),
        "samples": len(single),
        "http_p50_ms": percentile(http, 50),
        "http_p99_ms": percentile(http, 99),
        "http_samples": len(http),
        "batch32_per_s": throughput,
        "bytes": info["bytes"],
        "ratio_to_fp32": info["ratio_to_fp32"],
        "accuracy": accuracy,
    }


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title=f"fingpt-infer, one request = one text, {torch.get_num_threads()} torch threads")
    for column in (
        "variant",
        "device",
        "p50 ms",
        "p99 ms (n)",
        "HTTP p50 ms",
        "HTTP p99 ms (n)",
        "batch-32 rec/s",
        "MB",
        "vs fp32",
        "accuracy",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["variant"],
            r["device"],
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f} ({r['samples']})",
            f"{r['http_p50_ms']:.1f}",
            f"{r['http_p99_ms']:.1f} ({r['http_samples']})",
            f"{r['batch32_per_s']:.1f}",
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['ratio_to_fp32']:.2f}",
            f"{r['accuracy']:.4f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="a conf/model option (default: minilm)")
    parser.add_argument("--steps", type=int, default=40, help="training steps of batch 32 before publishing")
    parser.add_argument("--seconds", type=float, default=15.0, help="time budget of each latency measurement")
    parser.add_argument("--requests", type=int, default=100, help="most requests of each latency measurement")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the published model here")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_infer-") as scratch:
        root = args.workdir or Path(scratch)
        folder, test = train_and_publish(args.model, args.steps, root)
        rows = []
        for variant in args.variants:
            rows.append(measure(folder, variant, test, args, root / "audit.jsonl"))
            print(json.dumps(rows[-1]))
    print_table(rows, Console(width=160))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"model": args.model, "steps": args.steps, "threads": args.threads, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
