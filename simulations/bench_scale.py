"""How a simulated federation scales with the number of banks: round time and the operator's memory.

    python -m fingpt_federated.simulations.bench_scale --banks 100 1000 [--sampled 20] [--rounds 3]
        [--rows-per-bank 40] [--test-rows 800] [--out DIR] [OVERRIDE ...]

One `fingpt-sim` run per bank count: the tiny encoder, synthetic news dealt out one bank per profile
instance (`data.synthetic.num_banks`), FedAvg, `--sampled` banks trained and evaluated per round
(fraction = sampled / banks). The global test set is held at `--test-rows` rows whatever the bank
count, so that the central evaluation costs the same in every run. While a run goes, the peak
resident memory (VmHWM) of each process of its tree is sampled every 0.5 s; the operator's process is
`flwr-simulation`, which runs the ServerApp and Flower's simulation runtime (the Ray driver). Prints a
table and writes `scale.json` into `--out`: per bank count the round times, the later rounds' mean and
its ratio to the first count's, peak memory per process kind, the run folder's size and file count and
the size of metrics.json. Hydra overrides after the options change the setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

KINDS = ("flwr-simulation", "flower-superlink", "flower-superexec", "ClientAppActor", "raylet", "gcs_server")
OPERATOR = "flwr-simulation"
SAMPLE_S = 0.5


def sim_command(banks: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    fraction = args.sampled / banks
    return [
        str(Path(sys.executable).parent / "fingpt-sim"),
        "model=tiny_encoder",
        "strategy=fedavg",
        "federation=natural",
        f"data.synthetic.num_banks={banks}",
        f"data.synthetic.rows_per_bank={args.rows_per_bank}",
        f"data.split.test_fraction={args.test_rows / (banks * args.rows_per_bank):.6g}",
        f"federation.rounds={args.rounds}",
        f"federation.fraction_train={fraction:.6g}",
        f"federation.fraction_evaluate={fraction:.6g}",
        "publish.enabled=false",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]


def kind_of(process: psutil.Process) -> str:
    command = " ".join(process.cmdline())
    return next((kind for kind in KINDS if kind in command), process.name())


def peak_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    return 0


def watch(process: subprocess.Popen) -> dict[str, int]:
    """Peak resident MiB per process kind of `process`'s tree (the largest process of each kind) until it ends."""
    root = psutil.Process(process.pid)
    peaks: dict[str, int] = {}
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in tree:
            try:
                kind = kind_of(member)
                peaks[kind] = max(peaks.get(kind, 0), peak_mib(member.pid))
            except (psutil.Error, OSError):
                continue
        time.sleep(SAMPLE_S)
    return peaks


def folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def run_one(banks: int, args: argparse.Namespace) -> dict:
    run_dir = args.out / f"banks_{banks}"
    started = time.perf_counter()
    with open(args.out / f"banks_{banks}.log", "w") as log:
        process = subprocess.Popen(sim_command(banks, args, run_dir), stdout=log, stderr=subprocess.STDOUT)
        peaks = watch(process)
    if process.wait() != 0:
        raise SystemExit(f"bench_scale: fingpt-sim with {banks} banks failed (log: {args.out}/banks_{banks}.log)")
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = [float(s) for s in summary["round_seconds"]]
    size, files = folder_size(run_dir)
    return {
        "banks": banks,
        "sampled": args.sampled,
        "round_seconds": rounds,
        "later_rounds_mean_s": statistics.fmean(rounds[1:]) if len(rounds) > 1 else rounds[0],
        "wall_s": time.perf_counter() - started,
        "operator_peak_mib": peaks.get(OPERATOR, 0),
        "peak_mib_by_process": peaks,
        "run_folder_mib": size / 2**20,
        "run_folder_files": files,
        "metrics_json_bytes": (run_dir / "metrics.json").stat().st_size,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--sampled", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows-per-bank", type=int, default=40)
    parser.add_argument("--test-rows", type=int, default=800)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scale"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args(argv)
    if any(banks < args.sampled for banks in args.banks):
        parser.error("every --banks count must be at least --sampled")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(banks, args) for banks in args.banks]
    for row in rows:
        row["later_rounds_vs_first"] = row["later_rounds_mean_s"] / rows[0]["later_rounds_mean_s"]
    (args.out / "scale.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print("banks  sampled  round seconds        later mean  vs first  operator MiB  run folder MiB  files")
    for r in rows:
        times = " ".join(f"{s:.2f}" for s in r["round_seconds"])
        print(
            f"{r['banks']:>5}  {r['sampled']:>7}  {times:<20} {r['later_rounds_mean_s']:>10.2f}  "
            f"{r['later_rounds_vs_first']:>7.2f}x  {r['operator_peak_mib']:>12}  {r['run_folder_mib']:>14.1f}  "
            f"{r['run_folder_files']:>5}"
        )
    print(f"written: {args.out / 'scale.json'}")


if __name__ == "__main__":
    main()
