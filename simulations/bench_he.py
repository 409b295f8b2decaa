"""Benchmark of BFV and CKKS parameter choices for the add-only encrypted FedAvg.

BFV rows (the default scheme) quantize each bank's weighted update to integers (step chosen by
`HEParams` so that no sum of `max_summands` updates wraps; their bound is set to this workload's
largest |examples x value|, 1e4) and sum exactly; CKKS rows encrypt floats. For each
alternative, BANKS banks encrypt a LoRA-sized update (values of magnitude 1e-2..1
with random signs) weighted by their example count; the operator aggregates with the public
context; a bank decrypts the weighted mean. Two weightings are run: mixed example counts
(1 to 10,000) and all weights 1 (the smallest total weight, hence the largest error of the mean).
Reported: serialized bytes per parameter of one bank's upload and of the aggregate download
(against fp32's 4 bytes), the uncompressed size (2 polynomials x data moduli x 8 bytes per slot)
to show what SEAL's built-in zstd compression saves, CPU seconds per million parameters (process
time, so that other jobs on a shared machine do not inflate them), and the max
absolute error of the mean against plaintext FedAvg: raw (CKKS noise) and as published (rounded
to the 2^-22 grid; BFV: the quantization error, nothing to round), and that error relative to
the largest value of the plaintext mean (mixed weights). BFV's error of the mean is at most about
sqrt(banks) x step / (2 x total examples): small for real example counts, large for the weights-1
column, whose total of 10 examples is the worst case. The default is marked in the note column.
Run: `python -m fingpt_federated.simulations.bench_he [--params N]`.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from fingpt_federated.privacy import bfv_quantize
from fingpt_federated.privacy.he_aggregate import aggregate
from fingpt_federated.privacy.he_context import HEContext, HEParams, new_context
from fingpt_federated.privacy.he_packing import (
    EncryptedUpdate,
    decrypt_mean,
    decrypt_sum,
    encrypt_update,
    flatten,
    schema_of,
)

TARGET_ERROR = 1e-6
BFV_TARGET_RELATIVE_ERROR = 1e-3
TARGET_BYTES = 16.0
FP32_BYTES = 4.0
NOISE_MARGIN_BITS = 4.0
HEADROOM_BANKS = 64
HEADROOM_WEIGHTED_VALUE = 1e4


@dataclass(frozen=True)
class Alternative:
    params: HEParams
    note: str


def alternatives(banks: int) -> list[Alternative]:
    """The measured grid. Smaller data moduli get the largest scale that still holds 10 x 1e4."""

    def alt(
        n: int, moduli: Sequence[int], scale: int, encryption: str, note: str, summands: int = banks
    ) -> Alternative:
        params = HEParams(
            scheme="ckks",
            poly_modulus_degree=n,
            coeff_mod_bit_sizes=tuple(moduli),
            global_scale_bits=scale,
            encryption=encryption,
            max_summands=summands,
        )
        return Alternative(params, note)

    def bfv(t: int, moduli: Sequence[int], note: str, summands: int = banks) -> Alternative:
        params = HEParams(
            plain_modulus=t,
            coeff_mod_bit_sizes=tuple(moduli),
            max_summands=summands,
            quantization_bound=HEADROOM_WEIGHTED_VALUE,
        )
        return Alternative(params, note)

    default = HEParams()
    return [
        bfv(default.plain_modulus, default.moduli, "DEFAULT scheme, t and moduli (he.yaml)"),
        bfv(default.plain_modulus, default.moduli, "default t, moduli; 64 banks", summands=64),
        bfv(1032193, [60, 36], "larger data prime"),
        bfv(65537, [30, 30], "moonshot: 16-bit t"),
        bfv(65537, [30, 30], "16-bit t, 64 banks", summands=64),
        alt(8192, [60, 40, 40, 60], 40, "asymmetric", "STACK-NOTES anchor"),
        alt(4096, [40, 20, 40], 20, "asymmetric", "STACK-NOTES 'unusable'"),
        alt(8192, [60, 20], 36, "symmetric", "N=8192, one data prime"),
        alt(4096, [60, 20], 36, "asymmetric", "public-key encryption"),
        alt(4096, [60, 20], 36, "symmetric", "largest prime SEAL allows"),
        alt(4096, [58, 20], 36, "symmetric", "CKKS default (scheme=ckks)", summands=HEParams().max_summands),
        alt(4096, [56, 20], 36, "symmetric", "smaller prime"),
        alt(4096, [52, 20], 33, "symmetric", "smaller prime"),
        alt(4096, [48, 20], 29, "symmetric", "smaller prime"),
        alt(4096, [44, 20], 25, "symmetric", "smaller prime"),
        alt(2048, [40, 14], 21, "symmetric", "N=2048 (max 54 bits)"),
    ]


def make_updates(num_params: int, banks: int, seed: int) -> list[dict[str, np.ndarray]]:
    """LoRA-like deltas packed from several tensors, so chunks straddle tensor borders."""
    rng = np.random.default_rng(seed)
    sizes = [num_params // 4, num_params // 4, num_params - 2 * (num_params // 4)]
    updates = []
    for _ in range(banks):
        update = {}
        for index, size in enumerate(sizes):
            magnitude = 10.0 ** rng.uniform(-2.0, 0.0, size)
            update[f"layer{index}.lora_B"] = (magnitude * rng.choice([-1.0, 1.0], size)).astype(np.float32)
        updates.append(update)
    return updates


def run_weighting(he: HEContext, updates: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, float]:
    """Encrypt, aggregate with the public context, decrypt; time each step and measure errors."""
    start = time.process_time()
    blobs = [encrypt_update(update, float(weight), he) for update, weight in zip(updates, weights, strict=True)]
    encrypt_s = (time.process_time() - start) / len(blobs)
    operator = he.public()
    start = time.process_time()
    aggregate_blob = aggregate(blobs, operator)
    aggregate_s = time.process_time() - start
    schema = schema_of(updates[0])
    start = time.process_time()
    published = flatten(decrypt_mean(aggregate_blob, he, schema, dtype=np.float64))
    decrypt_s = time.process_time() - start
    plain = sum(weight * flatten(update) for update, weight in zip(updates, weights, strict=True)) / weights.sum()
    summed = EncryptedUpdate.from_bytes(aggregate_blob)
    if he.params.scheme == "bfv":
        raw = decrypt_sum(aggregate_blob, he, schema)[0]  # exact: the quantization error is all there is
    else:
        raw = np.concatenate([np.asarray(ts.ckks_vector_from(he.context, chunk).decrypt()) for chunk in summed.chunks])
    return {
        "relative_error": float(np.max(np.abs(published - plain)) / np.max(np.abs(plain))),
        "up": len(blobs[0]),
        "down": len(aggregate_blob),
        "encrypt_s": encrypt_s,
        "aggregate_s": aggregate_s,
        "decrypt_s": decrypt_s,
        "raw_error": float(np.max(np.abs(raw / summed.weight - plain))),
        "published_error": float(np.max(np.abs(published - plain))),
    }


def measure(
    alternative: Alternative, updates: list[dict[str, np.ndarray]], mixed: np.ndarray
) -> dict[str, float | str]:
    """One table row; a `failure` instead of numbers when the parameters cannot hold the workload."""
    params = alternative.params
    he = new_context(params)
    num_params = flatten(updates[0]).size
    per_million = 1e6 / num_params
    row: dict[str, float | str] = {"N": params.poly_modulus_degree, "moduli": str(list(params.moduli))}
    row["scheme"] = params.scheme.upper()
    if params.scheme == "bfv":
        row["scale"] = f"t={params.plain_modulus}, step 2^{-bfv_quantize.quantization_bits(params)}"
    else:
        row["scale"] = f"2^{params.global_scale_bits}"
    row.update(enc=params.encryption[:4], note=alternative.note)
    row["raw_bpp"] = 2 * 8 * len(params.moduli[:-1]) * params.poly_modulus_degree / params.slots
    try:
        mixed_result = run_weighting(he, updates, mixed)
        ones_result = run_weighting(he, updates, np.ones(len(updates)))
    except ValueError as error:
        row["failure"] = str(error).split(";")[0]
        return row
    up_bpp = mixed_result["up"] / num_params
    row["up_bpp"] = up_bpp
    row["down_bpp"] = mixed_result["down"] / num_params
    row["x_fp32"] = up_bpp / FP32_BYTES
    for key in ("encrypt_s", "aggregate_s", "decrypt_s"):
        row[key] = mixed_result[key] * per_million
    row["err_mixed"] = mixed_result["raw_error"]
    row["err_ones"] = err_ones = ones_result["raw_error"]
    row["published"] = published = max(mixed_result["published_error"], ones_result["published_error"])
    row["relative"] = relative = mixed_result["relative_error"]  # weights 1: the worst case, in err w=1
    if params.scheme == "bfv":
        row["margin_bits"] = math.inf  # exact decryption: no encryption noise
        row["headroom"] = headroom = float(params.max_summands)  # the sum of this many updates at the bound cannot wrap
        meets = relative <= BFV_TARGET_RELATIVE_ERROR and up_bpp <= TARGET_BYTES and headroom >= len(updates)
    else:
        margin_bits = math.log2(math.ldexp(1.0, -params.round_bits) / max(err_ones, 1e-300))
        row["margin_bits"] = margin_bits
        row["headroom"] = headroom = params.sum_capacity / HEADROOM_WEIGHTED_VALUE
        meets = (
            published <= TARGET_ERROR
            and up_bpp <= TARGET_BYTES
            and margin_bits >= NOISE_MARGIN_BITS
            and headroom >= HEADROOM_BANKS
        )
    row["meets"] = "yes" if meets else "no"
    return row


def format_table(rows: list[dict[str, float | str]], banks: int) -> str:
    header = (
        "| scheme | N | moduli | scale | enc | up B/p | down B/p | raw B/p | x fp32 | enc CPU s/1M | "
        f"agg CPU s/1M ({banks} banks) | dec CPU s/1M | err mixed w | err w=1 | published err | rel err mixed w | "
        "noise under grid | banks at 1e4 | meets | note |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [str(row["scheme"]), str(row["N"]), str(row["moduli"]), str(row["scale"]), str(row["enc"])]
        if "failure" in row:
            cells += ["-", "-", f"{row['raw_bpp']:.0f}"] + ["-"] * 10 + ["no", f"{row['note']}: {row['failure']}"]
        else:
            cells += [
                f"{row['up_bpp']:.2f}",
                f"{row['down_bpp']:.2f}",
                f"{row['raw_bpp']:.0f}",
                f"{row['x_fp32']:.1f}x",
            ]
            cells += [f"{row['encrypt_s']:.2f}", f"{row['aggregate_s']:.2f}", f"{row['decrypt_s']:.2f}"]
            cells += [f"{row['err_mixed']:.1e}", f"{row['err_ones']:.1e}", f"{row['published']:.1e}"]
            cells.append(f"{row['relative']:.1e}")
            headroom = f"{row['headroom']:.0f}" if float(row["headroom"]) < 1e6 else ">1e6"
            margin = "exact" if math.isinf(float(row["margin_bits"])) else f"{row['margin_bits']:.1f} bits"
            cells += [margin, headroom, str(row["meets"]), str(row["note"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2**18, help="parameters per update (timings are scaled to 1M)")
    parser.add_argument("--banks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    updates = make_updates(args.params, args.banks, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    mixed = rng.integers(1, 10_001, args.banks).astype(np.float64)
    mixed[0], mixed[-1] = 1.0, 10_000.0
    print(
        f"{args.banks} banks x {args.params:,} parameters, example counts {sorted(mixed.astype(int).tolist())}.\n"
        f"meets = upload <= {TARGET_BYTES:g} B/param (4x fp32) and, BFV: error of the mean <= "
        f"{BFV_TARGET_RELATIVE_ERROR:g} of its largest value, its max_summands covering these banks; CKKS: published "
        f"error <= {TARGET_ERROR:g}, the raw error with weights 1 at least {NOISE_MARGIN_BITS:g} bits under the 2^-22 "
        f"rounding grid (so rounding hides the CKKS noise) and room for >= {HEADROOM_BANKS} banks each at "
        "|examples x value| = 1e4 without overflow"
    )
    rows = []
    for alternative in alternatives(args.banks):
        rows.append(measure(alternative, updates, mixed))
        print(f"  measured {rows[-1]['N']} {rows[-1]['moduli']} {rows[-1]['scale']} {rows[-1]['enc']}", flush=True)
    print(format_table(rows, args.banks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
