"""What a deployed round costs beyond the banks' compute; prints a summary and writes deploy.json.

    python -m fingpt_federated.simulations.bench_deploy                 # bank workers (the default)
    python -m fingpt_federated.simulations.bench_deploy --no-worker --task-poll-s 1.0   # before

A loopback deployment with TLS, node authentication and the fleet gateway: an operator's
SuperLink, `--banks` banks started with `fingpt-client start` (each with its own key, data and
FLWR_HOME), first a trivial ServerApp/ClientApp pair (simulations/bench_deploy_floor.py: Flower's
own floor, `--floor-rounds` rounds), then the real run: the same work as `fingpt-sim` with
`model=tiny_encoder` (or `--model minilm`), IID generated news, `--rounds` rounds of
`strategy.local_steps=2`, no bank-side evaluation.

Per round: wall time (the ServerApp's `round_seconds`, central evaluation excluded), the slowest
bank's compute (its client-reported `seconds` of local training), and the overhead (wall minus
that). Per bank: how many times it loaded the backbone during the run (`backbone_loads`, summed
over its train replies). Means over rounds 2.. are the steady state (round 1 also builds models).
`breakdown` follows each round's critical path through the ServerApp, Flower and the slowest
bank's ClientApp and worker (simulations/bench_deploy_breakdown.py); `floor_breakdown` the floor's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w
from omegaconf import OmegaConf

from fingpt_federated.conf import CONFIG_DIR
from fingpt_federated.data.federation_layout import FederationLayout, prepare_federation
from fingpt_federated.federation.node_keys import generate_bank_keys
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.certificates import create_ca, create_server_certificate
from fingpt_federated.server.control import FlowerControl, write_connection
from fingpt_federated.server.deployment import RunRequest, follow, load_config, prepare_run_dir, wait_for_banks
from fingpt_federated.server.flower_app import COMPLETED
from fingpt_federated.server.run_folder import METRICS_JSON, TIMINGS_JSON
from fingpt_federated.server.superlink import LOOPBACK, OperatorServices, OperatorSettings
from fingpt_federated.simulations import bench_deploy_floor as floor
from fingpt_federated.simulations.bench_deploy_breakdown import breakdown, floor_breakdown

OUTPUT = "deploy.json"
BANK_WAIT_S = 600.0
BANK_STOP_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"model={args.model}",
        "federation=iid",
        f"federation.num_banks={args.banks}",
        "data.synthetic.rows_per_bank=60",
        f"federation.rounds={args.rounds}",
        "strategy.local_steps=2",
        "federation.fraction_evaluate=0",
    ]


def synthetic_layout(folder: Path, num_banks: int) -> FederationLayout:
    data = OmegaConf.load(CONFIG_DIR / "data" / "synthetic_news.yaml")
    data.synthetic.rows_per_bank = 60
    federation = OmegaConf.load(CONFIG_DIR / "federation" / "natural.yaml")
    federation.update({"partitioner": "iid", "key": None, "num_banks": num_banks, "min_size": 2})
    return prepare_federation(OmegaConf.create({"data": data, "federation": federation, "seed": 0}), folder)


def start_bank(args: argparse.Namespace, key: Path, data: Path, server: str, ca: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "fingpt_federated.client.cli",
        "start",
        *("--server", server, "--ca", str(ca), "--key", str(key), "--data", str(data)),
        *("--runtime-port", str(free_port()), "--max-retries", "200", "--max-wait", "900"),
        *("--task-poll-s", str(args.task_poll_s), "--worker" if args.worker else "--no-worker"),
    ]
    log = open(key.parent / "bank.log", "w")  # noqa: SIM115 (open while the bank runs)
    env = {**os.environ, "FLWR_HOME": str(key.parent / "flwr-home")}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_banks(banks: list[subprocess.Popen]) -> None:
    for bank in banks:
        if bank.poll() is None:
            bank.send_signal(signal.SIGTERM)
    for bank in banks:
        try:
            bank.wait(timeout=BANK_STOP_S)
        except subprocess.TimeoutExpired:
            bank.kill()
            bank.wait()


def run_floor(control: FlowerControl, root: Path, rounds: int) -> dict[str, Any]:
    """Flower's floor: the trivial apps' round times (and messages' times) on the same services and banks."""
    app = root / "floor" / "app"
    app.mkdir(parents=True)
    project = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fingpt-floor", "version": "1.0.0", "license": "Apache-2.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fingpt-federated",
                    "components": {
                        "serverapp": f"{floor.__name__}:server",
                        "clientapp": f"{floor.__name__}:client",
                    },
                    "config": {floor.RUN_DIR_KEY: "", floor.ROUNDS_KEY: 0},
                }
            }
        },
    }
    (app / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    run_config = root / "floor" / "run_config.toml"
    run_config.write_text(tomli_w.dumps({floor.RUN_DIR_KEY: str(root / "floor"), floor.ROUNDS_KEY: rounds}))
    run_id = control.submit(app, run_config)
    info = follow(control, run_id, root / "floor" / "run.log")
    if info.get("status") != COMPLETED:
        raise RuntimeError(f"the floor run ended {info.get('status')}: {info.get('status-details')}")
    return dict(json.loads((root / "floor" / floor.FLOOR_FILE).read_text()))


def run_real(control: FlowerControl, args: argparse.Namespace, root: Path, test_dir: Path) -> Path:
    run_dir = root / "run"
    app_dir, run_config = prepare_run_dir(RunRequest(run_dir, load_config(overrides(args), run_dir), test_dir))
    run_id = control.submit(app_dir, run_config)
    info = follow(control, run_id, run_dir / "flower.log")
    if info.get("status") != COMPLETED:
        raise RuntimeError(f"the run ended {info.get('status')}: {info.get('status-details')}")
    return run_dir / METRICS_JSON


def summarise(metrics_path: Path, floor_s: list[float]) -> dict[str, Any]:
    rows = json.loads(metrics_path.read_text())["rows"]
    walls = {r["round"]: r["metrics"]["round_seconds"] for r in rows if "round_seconds" in r["metrics"]}
    train = [r for r in rows if r["phase"] == "train" and r["status"] == "ok" and r["bank"] != "federation"]
    rounds = []
    for number in sorted(walls):
        compute = [r["metrics"]["seconds"] for r in train if r["round"] == number]
        slowest = max(compute) if compute else float("nan")
        rounds.append(
            {"round": number, "wall_s": walls[number], "compute_s": slowest, "overhead_s": walls[number] - slowest}
        )
    loads: dict[str, int] = {}
    for row in train:
        loads[row["bank"]] = loads.get(row["bank"], 0) + int(row["metrics"].get("backbone_loads", 0))
    steady = rounds[1:] or rounds
    floor_steady = floor_s[1:] or floor_s
    summary = {
        "rounds": rounds,
        "mean_round_s": statistics.mean(r["wall_s"] for r in steady),
        "mean_compute_s": statistics.mean(r["compute_s"] for r in steady),
        "mean_overhead_s": statistics.mean(r["overhead_s"] for r in steady),
        "floor_round_s": floor_s,
        "floor_mean_s": statistics.mean(floor_steady),
        "backbone_loads_per_bank": loads,
    }
    summary["targets"] = {
        "overhead_within_floor_plus_1s": summary["mean_overhead_s"] <= summary["floor_mean_s"] + 1.0,
        "one_backbone_load_per_bank": bool(loads) and all(n == 1 for n in loads.values()),
    }
    return summary


def bench(args: argparse.Namespace) -> dict[str, Any]:
    root = args.out.resolve()
    root.mkdir(parents=True, exist_ok=False)
    workdir = root / "operator"
    create_ca(workdir / "tls")
    tls = create_server_certificate(workdir / "tls", ["localhost"])
    layout = synthetic_layout(root / "data", args.banks)
    registry = BankRegistry(workdir)
    keys = []
    for number in range(args.banks):
        private, public = generate_bank_keys(root / f"bank{number}" / "bank.key")
        registry.add(public, layout.bank_names[number])
        keys.append(private)
    settings = OperatorSettings(workdir, tls, fleet_host=LOOPBACK, fleet_port=free_port(), control_port=free_port())
    control = FlowerControl(settings.flwr_home)
    write_connection(settings.flwr_home, settings.control_port, tls.ca_cert)
    banks: list[subprocess.Popen] = []
    started = time.perf_counter()

    def admit_banks() -> None:
        registry.sync(control)

    with OperatorServices(settings, before_gateway=admit_banks):
        try:
            server = f"localhost:{settings.fleet_port}"
            for key, data in zip(keys, layout.bank_dirs, strict=True):
                banks.append(start_bank(args, key, data, server, tls.ca_cert))
            wait_for_banks(control, registry, args.banks, BANK_WAIT_S)
            floor_run = run_floor(control, root, args.floor_rounds)
            metrics = run_real(control, args, root, layout.test_dir)
        finally:
            stop_banks(banks)
    logs = [key.parent / "bank.log" for key in keys]
    return {
        "mode": "worker" if args.worker else "per-message",
        "model": args.model,
        "banks": args.banks,
        "task_poll_s": args.task_poll_s,
        "tls": True,
        "node_auth": True,
        "load_average": os.getloadavg(),
        "bench_seconds": time.perf_counter() - started,
        **summarise(metrics, list(floor_run["round_seconds"])),
        "breakdown": breakdown(metrics.parent / TIMINGS_JSON, logs),
        "floor_breakdown": floor_breakdown(floor_run),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_encoder", help="model config: tiny_encoder or minilm")
    parser.add_argument("--banks", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor-rounds", type=int, default=3)
    parser.add_argument("--worker", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--task-poll-s", type=float, default=0.1, help="the banks' SuperExec poll (Flower: 1.0)")
    parser.add_argument("--out", type=Path, default=Path(f"/tmp/bench-deploy-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = parser.parse_args(argv)
    result = bench(args)
    (args.out / OUTPUT).write_text(json.dumps(result, indent=2), encoding="utf-8")
    per_round = ("rounds", "breakdown", "floor_breakdown")
    print(json.dumps({k: v for k, v in result.items() if k not in per_round}, indent=2))
    for row in result["rounds"]:
        wall, compute, overhead = row["wall_s"], row["compute_s"], row["overhead_s"]
        print(f"round {row['round']}: wall {wall:.2f} s, slowest bank {compute:.2f} s, overhead {overhead:.2f} s")
    for row in result["breakdown"].get("rounds", []):
        print(f"round {row['round']} breakdown: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "round"))
    for row in result["floor_breakdown"].get("rounds", []):
        print(f"floor round {row['round']}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "round"))
    print(f"wrote {args.out / OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
