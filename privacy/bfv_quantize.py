"""BFV's fixed point: clip a bank's weighted update, round it to integers without bias, and back.

BFV adds integers modulo the plain modulus t exactly, so each bank turns its weighted update
`examples * drift` into integers before encrypting it:

1. clip every value to +-B (`quantization_bound`, in the weighted unit: examples x value);
2. divide by the step s = 2^-b (`quantization_bits` b) and round STOCHASTICALLY: x/s goes to
   floor(x/s) + 1 with probability frac(x/s), else to floor(x/s). The expected integer is exactly
   x/s, so the rounding adds zero-mean noise of variance at most s^2/4 per bank and value, and the
   banks' errors average out instead of adding up as round-to-nearest's bias would;
3. the operator adds the integers under encryption; a bank decrypts the integer sum S and the
   global mean is S * s / (sum of the example counts).

Weighting. The example count multiplies the update BEFORE quantization (as with CKKS, and as
Flower reports counts in the clear anyway), so the operator's plain sum of ciphertexts is FedAvg's
numerator and partial participation needs nothing special. The price is range: the bound B must
hold the largest bank's count times its largest drift value. Quantizing the drift alone and
multiplying the integers by the count would keep the bound count-free but multiply each bank's
rounding error by its count and spend the range of t on sum(counts) x levels, far coarser for the
same t (t = 2^20 and 9,500 examples would leave 54 levels per value); normalising by the total
count needs the total before the round, which the banks do not have. So B is in examples x value;
a bank whose weighted value exceeds B is clipped there (logged by the bank), a bias the bound's
choice must keep rare: drifts of LoRA and head weights after a few rounds of a few steps stay
well below 0.1, so the default 2048 leaves room for 20,000 examples at 0.1.

Wrap-around. The sum of at most `max_summands` updates lies in +-max_summands x L, L =
ceil(B/s) integer levels per bank; it must stay within +-(t-1)/2 or it wraps around silently.
`check_bfv_range` refuses any setting where it could, saying the largest federation and bound the
setting allows; without `quantization_bits` the finest step that fits is chosen.

Randomness. In runs the rounding draws from a generator seeded by the OS (`secrets`): a fixed
seed would make the rounding of a bank predictable from its update. Tests pass a seed.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fingpt_federated.privacy.he_context import HEParams

MIN_LEVELS = 16
"""Fewest integer levels per bank and sign a setting may leave (coarser is refused as useless)."""


def _is_prime(value: int) -> bool:
    if value < 2:
        return False
    return all(value % divisor for divisor in range(2, math.isqrt(value) + 1))


def capacity_per_bank(params: HEParams) -> int:
    """Integer levels (per sign) each of `max_summands` banks may use without the sum wrapping."""
    return ((params.plain_modulus - 1) // 2) // params.max_summands


def quantization_bits(params: HEParams) -> int:
    """The step exponent b (step 2^-b): the configured one, or the finest that cannot wrap."""
    if params.quantization_bits is not None:
        return int(params.quantization_bits)
    capacity = capacity_per_bank(params)
    bits = math.floor(math.log2(capacity / params.quantization_bound)) if capacity > 0 else 0
    while bits > -64 and math.ceil(math.ldexp(params.quantization_bound, bits)) > capacity:
        bits -= 1
    return bits


def levels(params: HEParams) -> int:
    """Largest absolute integer one bank's clipped update can round to."""
    return math.ceil(math.ldexp(params.quantization_bound, quantization_bits(params)))


def check_bfv_range(params: HEParams) -> None:
    """Refuse BFV parameters SEAL cannot batch with, or whose largest sum could wrap around t."""
    t, n = params.plain_modulus, params.poly_modulus_degree
    if not _is_prime(t) or t % (2 * n) != 1:
        raise ValueError(
            f"plain_modulus {t} must be a prime = 1 mod 2N = {2 * n} for BFV batching (e.g. 65537 or 1032193 at N=4096)"
        )
    if t.bit_length() >= params.data_modulus_bits:
        raise ValueError(f"plain_modulus {t} needs fewer bits than the data modulus ({params.data_modulus_bits} bits)")
    if not (math.isfinite(params.quantization_bound) and params.quantization_bound > 0):
        raise ValueError(f"quantization_bound must be a positive number, got {params.quantization_bound}")
    half = (t - 1) // 2
    bits = quantization_bits(params)
    per_bank = levels(params)
    if params.max_summands * per_bank <= half and per_bank >= MIN_LEVELS:
        return
    step = f"2^{-bits}"
    most_banks = half // per_bank if per_bank else 0
    largest_bound = math.ldexp(capacity_per_bank(params), -bits)
    raise ValueError(
        f"BFV with plain_modulus {t}, step {step} and quantization_bound {params.quantization_bound:g}: "
        f"{params.max_summands} banks could sum to {params.max_summands * per_bank} levels, beyond the "
        f"+-{half} the plain modulus holds (or fewer than {MIN_LEVELS} levels per bank). This setting allows at "
        f"most {most_banks} banks (max_summands) at this bound, or quantization_bound <= {largest_bound:g} for "
        f"{params.max_summands} banks; or choose a larger plain_modulus or a coarser quantization_bits"
    )


def new_rng(seed: int | None = None) -> np.random.Generator:
    """The rounding's generator: seeded by the OS unless a test passes `seed`."""
    return np.random.default_rng(secrets.randbits(128) if seed is None else seed)


def quantize(weighted: np.ndarray, params: HEParams, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Clip to +-quantization_bound, scale by 2^bits and round stochastically: int64 values and the
    number of values that were clipped."""
    bound = params.quantization_bound
    clipped = int(np.count_nonzero(np.abs(weighted) > bound))
    scaled = np.ldexp(np.clip(weighted, -bound, bound), quantization_bits(params))
    floor = np.floor(scaled)
    integers = floor + (rng.random(scaled.shape) < (scaled - floor))
    return integers.astype(np.int64), clipped


def dequantize(integers: np.ndarray, params: HEParams) -> np.ndarray:
    """Integer (sums) back to the weighted unit, float64."""
    return np.ldexp(np.asarray(integers, dtype=np.float64), -quantization_bits(params))
