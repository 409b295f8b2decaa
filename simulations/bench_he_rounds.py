"""Round time and bytes on the wire of an encrypted simulated federation against the same plaintext one.

    python -m fingpt_federated.simulations.bench_he_rounds                       # MiniLM, 3 banks, 3 rounds
    python -m fingpt_federated.simulations.bench_he_rounds model=tiny_encoder    # any Hydra override

Both runs are `fingpt-sim` on Flower's simulation engine with the same seeded banks and local
work; only `privacy` differs. Round time is the ServerApp's `round_seconds` (train and evaluate
phases with aggregation, without the central test evaluation the encrypted run cannot do),
averaged over rounds 2.. (round 1 includes starting Ray's actors and building the model in them).
Bytes are the model state per bank per parameter in the last round (privacy.he: BFV or CKKS ciphertexts
up and down; none: fp32 arrays). Writes bench_he_rounds.json in the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors.numpy import load_file

from fingpt_federated.server.app import FINAL_STATE, METRICS_JSON
from fingpt_federated.server.history import History
from fingpt_federated.simulations.bench_federation import config
from fingpt_federated.simulations.report import wire_bytes_per_parameter
from fingpt_federated.simulations.sim import simulate
from fingpt_federated.strict_json import jsonable

DEFAULTS = (
    "model=minilm",
    "federation=iid",
    "federation.num_banks=3",
    "federation.rounds=3",
    "strategy.local_steps=4",
    "model.max_length=32",
)


def measure(overrides: list[str], privacy: str, run_dir: Path) -> dict[str, float]:
    summary = simulate(config(*DEFAULTS, *overrides, f"privacy={privacy}"), run_dir, echo=False)
    history = History.from_json((run_dir / METRICS_JSON).read_text(encoding="utf-8"))
    params = sum(value.size for value in load_file(str(run_dir / FINAL_STATE)).values())
    up, down = wire_bytes_per_parameter(history, params)
    warm = [r.seconds for r in summary.rounds if r.round >= 2 and not math.isnan(r.seconds)]
    return {
        "params": params,
        "round_s": sum(warm) / len(warm),
        "up_bytes_per_param": up,
        "down_bytes_per_param": down,
        "final_test_accuracy": summary.final.test_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_he_rounds"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = parser.parse_args()
    runs = {privacy: measure(args.overrides, privacy, args.out / privacy) for privacy in ("none", "he")}
    results: dict[str, dict[str, float] | float] = {
        **runs,
        "he_over_plain_round_time": runs["he"]["round_s"] / runs["none"]["round_s"],
    }
    (args.out / "bench_he_rounds.json").write_text(json.dumps(jsonable(results), indent=2), encoding="utf-8")
    print(json.dumps(jsonable(results), indent=2))


if __name__ == "__main__":
    main()
