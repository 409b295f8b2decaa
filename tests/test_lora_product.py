"""LoRA aggregation by the mean of the products B·A (server/lora_product.py): the maths, and a real run."""

from __future__ import annotations

import numpy as np
import pytest
from federation_helpers import InProcessGrid, config, one_torch_thread, simulated_nodes, write_federation  # noqa: F401

from fingpt_federated.client.app import app as client_app
from fingpt_federated.server.app import run_federation
from fingpt_federated.server.history import FEDERATION
from fingpt_federated.server.lora_product import fitted_b, lora_pairs, product_error, refit
from fingpt_federated.simulations.sim import simulate

RANK, IN, OUT = 4, 12, 10


def factors(seed: int, banks: int = 3, shared_a: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base_a = rng.normal(size=(RANK, IN))
    a = [base_a if shared_a else base_a + rng.normal(scale=0.5, size=(RANK, IN)) for _ in range(banks)]
    b = [rng.normal(size=(OUT, RANK)) for _ in range(banks)]
    return a, b


def exact_mean(a: list[np.ndarray], b: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * bk @ ak for w, ak, bk in zip(weights, a, b, strict=True))  # type: ignore[return-value]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_fitted_b_is_never_further_from_the_mean_product_than_fedavgs_mean(seed):
    a, b = factors(seed)
    weights = np.array([0.5, 0.3, 0.2])
    target = exact_mean(a, b, weights)
    mean_a = sum(w * x for w, x in zip(weights, a, strict=True))
    mean_b = sum(w * x for w, x in zip(weights, b, strict=True))
    fedavg = np.linalg.norm(mean_b @ mean_a - target)
    fitted = np.linalg.norm(fitted_b(a, b, weights) @ mean_a - target)
    assert fitted < fedavg * 0.9  # heterogeneous A: the cross terms FedAvg keeps are a real error


def test_with_one_shared_a_the_fitted_b_gives_the_exact_mean_product():
    a, b = factors(3, shared_a=True)
    weights = np.array([0.2, 0.2, 0.6])
    fitted = fitted_b(a, b, weights) @ a[0]
    np.testing.assert_allclose(fitted, exact_mean(a, b, weights), atol=1e-10)


def test_the_product_error_without_forming_the_product_matches_the_explicit_one():
    a, b = factors(4)
    weights = np.array([0.1, 0.6, 0.3])
    some_a, some_b = a[0] * 0.7, b[2] - 1.0
    residual, total = product_error(a, b, weights, some_a, some_b)
    target = exact_mean(a, b, weights)
    assert residual == pytest.approx(np.linalg.norm(some_b @ some_a - target) ** 2, rel=1e-9)
    assert total == pytest.approx(np.linalg.norm(target) ** 2, rel=1e-9)


def test_refit_changes_only_b_factors_of_complete_pairs_and_keeps_dtypes():
    a, b = factors(5, banks=2)
    weights = np.array([0.5, 0.5])
    layer = "encoder.layer.0.query."
    states = [
        {f"{layer}lora_A.default.weight": ak.astype(np.float32), f"{layer}lora_B.default.weight": bk.astype(np.float32),
         "head.weight": np.full((2, 3), float(k), np.float32), "x.lora_A.default.weight": ak.astype(np.float32)}
        for k, (ak, bk) in enumerate(zip(a, b, strict=True))
    ]  # fmt: skip
    mean = {name: (states[0][name] + states[1][name]) / 2 for name in states[0]}
    assert lora_pairs(mean) == [(f"{layer}lora_A.default.weight", f"{layer}lora_B.default.weight")]
    out, before, after = refit(mean, states, weights)
    assert set(out) == set(mean) and {v.dtype for v in out.values()} == {np.dtype(np.float32)}
    for name in (f"{layer}lora_A.default.weight", "head.weight", "x.lora_A.default.weight"):
        np.testing.assert_array_equal(out[name], mean[name])
    assert not np.allclose(out[f"{layer}lora_B.default.weight"], mean[f"{layer}lora_B.default.weight"])
    assert 0 <= after < before


def test_product_is_refused_under_he_and_with_a_server_optimizer_before_any_bank_is_prepared(tmp_path):
    with pytest.raises(ValueError, match="lora_aggregation=product multiplies each bank's LoRA factors"):
        simulate(config("privacy=he", "++strategy.lora_aggregation=product"), tmp_path / "he")
    with pytest.raises(ValueError, match="Flower's FedAdam aggregates otherwise"):
        simulate(config("strategy=fedadam", "++strategy.lora_aggregation=product"), tmp_path / "adam")
    with pytest.raises(ValueError, match="must be mean or product, got 'svd'"):
        simulate(config("++strategy.lora_aggregation=svd"), tmp_path / "svd")
    assert not any(tmp_path.iterdir())


def test_a_run_with_product_aggregation_reports_a_smaller_product_error_than_the_mean(tmp_path):
    """The ServerApp with the real ClientApp in process (federation_helpers.InProcessGrid): three
    label-skewed banks, two rounds."""
    spec = write_federation(tmp_path / "data")
    nodes, run_config = simulated_nodes(tmp_path / "data" / "spec.json", len(spec.banks))
    cfg = config("federation.rounds=2", "strategy.local_steps=4", "++strategy.lora_aggregation=product", "seed=1")
    history = run_federation(InProcessGrid(client_app, nodes, run_config), cfg, spec, tmp_path / "run")
    rows = history.select("train", FEDERATION)
    assert [r.round for r in rows] == [1, 2]
    assert len([r for r in history.select("train") if r.bank != FEDERATION]) == 2 * 3
    for row in rows:
        assert 0 <= row.metrics["lora_product_error"] < row.metrics["lora_product_error_mean"]
