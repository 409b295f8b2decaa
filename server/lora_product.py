"""Aggregating LoRA factors so that the global adapter follows the mean of the banks' products B·A.

A LoRA adapter changes a weight by B·A. FedAvg averages A and B separately, and the product of
the means is not the mean of the products: with two banks,
mean(B)·mean(A) = (B1·A1 + B2·A2)/4 + (B1·A2 + B2·A1)/4, and the cross terms are noise the banks
never trained. The further the banks' adapters drift apart (non-IID data, many local steps), the
larger it is.

`LoRAProductMean` wraps FedAvg or FedProx (the strategies whose result is the weighted mean) and
replaces each B of the mean by the B that makes B·mean(A) closest, in Frobenius norm, to the exact
weighted mean P = sum_k w_k B_k A_k (least squares: B = P·pinv(mean(A))). Of all adapters that keep
the averaged A, it is the one nearest to the exact mean, so it is never further from P than
FedAvg's mean(B)·mean(A); where every bank has the same A (FFA-LoRA, or round 1 before A moved) it
is exactly P. A keeps its mean, so no direction of the adapter dies, as it can when the product is
re-factorised by SVD (a zero singular value gives a zero row of A, and B·A then gets no gradient).
Nothing forms P: with K banks of rank r, the cost is K products of r x in matrices per adapted layer.

Each round's train metrics gain `lora_product_error_mean` (what FedAvg's mean would have left) and
`lora_product_error` (what this leaves): ||B·A - P|| / ||P|| over all adapted layers together.

Plaintext only: under HE the operator sees ciphertexts of the banks' factors, whose products it
cannot form. Server optimizers (FedAdam, FedAvgM...) step from the mean; fitting B afterwards would
undo their step, so they are refused too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from fingpt_federated.server.strategy_wrapper import StrategyWrapper

LORA_A = "lora_A."
LORA_B = "lora_B."
MEAN_STRATEGIES = (FedAvg, FedProx)
"""The strategies whose aggregate is the weighted mean of the replies, nothing more."""


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted layer whose two factors are both in `names`."""
    present = set(names)
    pairs = []
    for name in sorted(present):
        if LORA_A in name and (partner := name.replace(LORA_A, LORA_B)) in present:
            pairs.append((name, partner))
    return pairs


def fitted_b(a_factors: list[np.ndarray], b_factors: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The B that makes B·mean(A) closest to sum_k w_k B_k A_k (weights sum to 1)."""
    mean_a = sum(w * a for w, a in zip(weights, a_factors, strict=True))
    assert isinstance(mean_a, np.ndarray)
    inverse = np.linalg.pinv(mean_a)  # in x r
    fitted = sum(w * b @ (a @ inverse) for w, a, b in zip(weights, a_factors, b_factors, strict=True))
    assert isinstance(fitted, np.ndarray)
    return fitted


def product_error(
    a_factors: list[np.ndarray], b_factors: list[np.ndarray], weights: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[float, float]:
    """(||b·a - P||², ||P||²) for P = sum_k w_k B_k A_k, without forming any out x in matrix:
    b·a - P = U·V with U = [b, w_1 B_1, ...] and V = [a; -A_1; ...], and ||U·V||² = trace(UᵀU·VVᵀ)."""
    left = np.concatenate([b, *(w * factor for w, factor in zip(weights, b_factors, strict=True))], axis=1)
    right = np.concatenate([a, *(-factor for factor in a_factors)], axis=0)
    residual = float(np.sum((left.T @ left) * (right @ right.T)))
    exact_left, exact_right = left[:, b.shape[1] :], -right[a.shape[0] :]
    exact = float(np.sum((exact_left.T @ exact_left) * (exact_right @ exact_right.T)))
    return max(residual, 0.0), max(exact, 0.0)


def refit(
    mean: Mapping[str, np.ndarray], states: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray
) -> tuple[dict[str, np.ndarray], float, float]:
    """`mean` with every B refitted; the relative product error of the mean's B and of the refitted B."""
    out = dict(mean)
    before = after = total = 0.0
    for a_name, b_name in lora_pairs(mean):
        a_factors = [np.asarray(state[a_name], dtype=np.float64) for state in states]
        b_factors = [np.asarray(state[b_name], dtype=np.float64) for state in states]
        mean_a = np.asarray(mean[a_name], dtype=np.float64)
        new_b = fitted_b(a_factors, b_factors, weights)
        old, exact = product_error(a_factors, b_factors, weights, mean_a, np.asarray(mean[b_name], dtype=np.float64))
        new, _ = product_error(a_factors, b_factors, weights, mean_a, new_b)
        before, after, total = before + old, after + new, total + exact
        out[b_name] = new_b.astype(mean[b_name].dtype)
    if total == 0.0:
        return out, 0.0, 0.0
    return out, float(np.sqrt(before / total)), float(np.sqrt(after / total))


class LoRAProductMean(StrategyWrapper):
    """FedAvg or FedProx whose LoRA B factors are refitted to the mean of the banks' products."""

    def __init__(self, strategy: Strategy) -> None:
        if type(strategy) not in MEAN_STRATEGIES:
            raise TypeError(f"{type(strategy).__name__} does not aggregate by the weighted mean alone")
        super().__init__(strategy)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        states = [_state(reply) for reply in replies]  # read first: the wrapped strategy may consume them
        weights = np.array([_weight(reply, self._weight_key()) for reply in replies], dtype=np.float64)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is None or not states or weights.sum() <= 0:
            return arrays, metrics
        mean = {name: array.numpy() for name, array in arrays.items()}
        refitted, before, after = refit(mean, states, weights / weights.sum())
        metrics = metrics if metrics is not None else MetricRecord()
        metrics["lora_product_error_mean"] = before
        metrics["lora_product_error"] = after
        return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in refitted.items()}), metrics

    def _weight_key(self) -> str:
        return str(getattr(self.strategy, "weighted_by_key", "num-examples"))


def _state(reply: Message) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for record in reply.content.array_records.values():
        state.update({name: array.numpy() for name, array in record.items()})
    return state


def _weight(reply: Message, key: str) -> float:
    for record in reply.content.metric_records.values():
        if key in record:
            return float(record[key])  # type: ignore[arg-type]
    return 0.0
