"""BFV, the default scheme: quantized updates whose encrypted sums are exact, and settings that could wrap refused."""

from __future__ import annotations

import numpy as np
import pytest

from fingpt_federated.privacy import bfv_quantize
from fingpt_federated.privacy.he_aggregate import aggregate
from fingpt_federated.privacy.he_context import HEParams, new_context
from fingpt_federated.privacy.he_packing import EncryptedUpdate, decrypt_mean, encrypt_update, flatten, schema_of

PARAMS = HEParams()  # the federation's defaults: BFV, N=4096, t=1032193, moduli [54, 30]
WEIGHTS = (1.0, 3.0, 250.0, 40.0, 4000.0, 17.0, 900.0, 2.0, 1200.0, 64.0)


@pytest.fixture(scope="module")
def he():
    return new_context(PARAMS)


def updates(count: int, size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"lora_B": rng.normal(0, 0.05, (size // 2,)), "head": rng.normal(0, 0.08, (size - size // 2,))}
        for _ in range(count)
    ]


def test_defaults_are_bfv_at_128_bit_security_and_under_4x_fp32(he):
    assert PARAMS.scheme == "bfv" and PARAMS.slots == 4096 and sum(PARAMS.moduli) <= 109  # HE standard, N=4096
    blob = encrypt_update({"w": np.zeros(4096 * 8)}, 1.0, he, rng=np.random.default_rng(0))
    assert len(blob) / (4096 * 8) <= 16.0  # bytes per parameter: 4x fp32


def test_ten_bank_mean_is_the_plaintext_mean_up_to_the_rounding_step(he):
    banks = updates(10, 5000)
    blobs = [
        encrypt_update(u, w, he, rng=np.random.default_rng(i))
        for i, (u, w) in enumerate(zip(banks, WEIGHTS, strict=True))
    ]
    summed = aggregate(blobs, he.public())
    mean = flatten(decrypt_mean(summed, he, schema_of(banks[0]), np.float64))
    plain = sum(w * flatten(u) for u, w in zip(banks, WEIGHTS, strict=True)) / sum(WEIGHTS)
    step = 2.0 ** -bfv_quantize.quantization_bits(PARAMS)
    # each bank's integer is within one step of examples x value: the mean within step x banks / total weight
    assert np.max(np.abs(mean - plain)) <= step * len(banks) / sum(WEIGHTS)
    assert EncryptedUpdate.from_bytes(summed).weight == sum(WEIGHTS)


def test_stochastic_rounding_is_unbiased_and_seeded_only_when_asked():
    values = np.full(200_000, 0.3)  # 0.3 / 2^-1 = 0.6 levels: round-to-nearest would give 1 (bias +0.2)
    integers, clipped = bfv_quantize.quantize(values, PARAMS, bfv_quantize.new_rng(7))
    assert clipped == 0 and set(np.unique(integers)) == {0, 1}
    assert abs(bfv_quantize.dequantize(integers, PARAMS).mean() - 0.3) < 0.005
    again, _ = bfv_quantize.quantize(values, PARAMS, bfv_quantize.new_rng(7))
    fresh, _ = bfv_quantize.quantize(values, PARAMS, bfv_quantize.new_rng())
    assert np.array_equal(integers, again) and not np.array_equal(integers, fresh)


def test_values_beyond_the_bound_are_clipped_and_counted(he):
    bound = PARAMS.quantization_bound
    integers, clipped = bfv_quantize.quantize(np.array([3 * bound, -5 * bound, 1.0]), PARAMS, bfv_quantize.new_rng(0))
    assert clipped == 2 and abs(integers[0]) == abs(integers[1]) == bfv_quantize.levels(PARAMS)
    blob = encrypt_update({"w": np.array([3.0 * bound, 0.0])}, 1.0, he, rng=np.random.default_rng(0))
    assert decrypt_mean(blob, he, schema_of({"w": np.zeros(2)}))["w"][0] == pytest.approx(bound)


def test_the_largest_sum_the_setting_allows_decrypts_without_wrapping(he):
    """max_summands banks all at +bound: the sum is the most the setting can produce, and it is exact."""
    small = HEParams(max_summands=3)
    he3 = new_context(small)
    blobs = [encrypt_update({"w": np.full(10, small.quantization_bound)}, 1.0, he3) for _ in range(3)]
    mean = decrypt_mean(aggregate(blobs, he3.public()), he3, schema_of({"w": np.zeros(10)}), np.float64)["w"]
    assert np.all(mean == small.quantization_bound)
    with pytest.raises(ValueError, match="exceeds max_summands=3"):
        aggregate([*blobs, blobs[0]], he3.public())


def test_a_setting_whose_sum_could_wrap_is_refused_with_what_it_allows():
    with pytest.raises(
        ValueError, match=r"at most 15 banks \(max_summands\) at this bound, or quantization_bound <= 504"
    ):
        HEParams(quantization_bits=4)  # 64 banks x 2048 x 2^4 levels > (1032193 - 1) / 2
    with pytest.raises(ValueError, match="at most 1 banks"):
        HEParams(plain_modulus=65537, coeff_mod_bit_sizes=(30, 30), quantization_bits=4)
    with pytest.raises(ValueError, match="prime = 1 mod 2N"):
        HEParams(plain_modulus=65539)
    with pytest.raises(ValueError, match="109 that the HE security standard allows"):
        HEParams(coeff_mod_bit_sizes=(60, 60))


def test_a_smaller_plain_modulus_gives_a_coarser_step_not_a_wrap():
    moonshot = HEParams(plain_modulus=65537, coeff_mod_bit_sizes=(30, 30), max_summands=16)
    assert bfv_quantize.levels(moonshot) * 16 <= (65537 - 1) // 2
    assert bfv_quantize.quantization_bits(moonshot) < bfv_quantize.quantization_bits(PARAMS)


def test_ckks_stays_selectable():
    ckks = HEParams(scheme="ckks")
    assert ckks.moduli == (58, 20) and ckks.slots == 2048
    he = new_context(ckks)
    state = {"w": np.linspace(-1, 1, 100)}
    mean = decrypt_mean(aggregate([encrypt_update(state, 2.0, he)], he.public()), he, schema_of(state), np.float64)
    assert np.max(np.abs(mean["w"] - state["w"])) < 1e-6
