"""Every plaintext train reply is checked before it can be aggregated: banks may be faulty or hostile.

`UpdateGate` is what `BankRounds` runs on each train reply of a plaintext round (under HE the
operator cannot look inside a ciphertext: server/encrypted_aggregation.py checks the envelope, and
the key-holding banks check the decrypted aggregate, client/encryption.py):

- per reply (`check`): exactly one state record (with SCAFFOLD, also the bank's control variate
  change: server/scaffold.py, checked as the state but float32) and one metric record (Flower's strategies skip
  the whole round's aggregation when one reply differs), a positive finite example count, the
  tensor names, shapes and dtypes of the state sent, only finite values, no replay (a state equal
  to a global state sent earlier in this run or to an update already accepted: a bank that did not
  train and resends an old state), and the L2 norm of the update (reply - state sent) within
  `UpdateChecks.max_norm` when set;
- per round (`outliers`): the update norms of the replies that passed, against `max_norm_ratio`
  times their median (from 3 replies on: the median of two is their mean and hides nothing), with
  SCAFFOLD the norms of their control variate changes likewise (a huge change would move the
  federation's c, which corrects every bank's local steps, while the update itself looks honest), and
  the metric keys, which must be the most common set (a reply with other keys would make Flower
  skip the round's aggregation);
- per round, opt-in (`bounds`): the influence of each accepted reply, against the round's medians:
  an update whose norm is above `clip_norm_ratio` times the median is scaled down to it (norm
  bounding, Sun et al. 2019, "Can You Really Backdoor Federated Learning?"; a SCAFFOLD control variate
  change against the median change norm the same way), and an example count
  above `max_examples_ratio` times the median count, or above the bank's `registered_examples`, is
  weighed as that many (FedAvg weighs a bank by the count it reports: a bank that inflates it would
  otherwise outweigh all the others); with a registry, a bank missing from it is refused. The counts of
  evaluate replies are capped the same two ways (`count_caps`): they weigh the validation metrics, and
  so the round that publishing takes;
- after aggregation (`non_finite`): a global state with a non-finite value is never adopted.

What is out of reach: a bank that lies consistently within the bounds (a small push in a chosen
direction, an old update perturbed by one bit). The opt-in robust aggregations
(conf/strategy/fedmedian.yaml, krum.yaml, fedtrimmedavg.yaml) blunt those. The memory of states
seen lives in the server process: a restarted server starts it afresh from the state it resumes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fingpt_federated.federation import protocol

K = TypeVar("K")
MIN_REPLIES_FOR_RATIO = 3


@dataclass
class UpdateChecks:
    """`strategy.update_checks`: bounds on the L2 norm of every plaintext update (reply - global sent).

    Names, shapes, dtypes, finite values and replays are always checked. `max_norm`: an absolute bound
    (null: none). `max_norm_ratio`: a bound relative to the median norm of the round's replies (null:
    none); 10 leaves room for honest non-IID banks and DP noise, and refuses a scaled or constant state.
    `replay_memory`: how many states (globals sent, updates accepted) the replay check remembers, the
    oldest forgotten first: it grows by the sampled banks every round, so a long run would grow without
    end (10,000: 500 rounds of 20 banks, about 2 MB; a forgotten state is old and far from the global).
    `clip_norm_ratio`, `max_examples_ratio` (null: off): bound what an accepted reply weighs instead of
    refusing it: its update (with SCAFFOLD, also its control variate change) is scaled down to
    `clip_norm_ratio` times the round's median norm, its example count (train and evaluate) capped at
    `max_examples_ratio` times the median count. Off by default: on banks of very different sizes a
    count cap takes weight from the honest large banks too (the audit measures both,
    docs/privacy-utility.md "Bounded influence"). `registered_examples`: bank name -> the most
    records it may be weighed as, agreed when it joined (empty: no registry; `fingpt-sim` fills it from
    the prepared banks with `simulation.register_examples=true`); a bank not in a non-empty registry is refused.
    """

    max_norm: float | None = None
    max_norm_ratio: float | None = 10.0
    replay_memory: int = 10_000
    clip_norm_ratio: float | None = None
    max_examples_ratio: float | None = None
    registered_examples: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for bank, count in self.registered_examples.items():
            if not (isinstance(count, int | float) and math.isfinite(count) and count > 0):
                raise ValueError(
                    f"strategy.update_checks.registered_examples.{bank} must be a positive count, got {count}"
                )
        for key in ("max_norm", "max_norm_ratio", "clip_norm_ratio", "max_examples_ratio"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"strategy.update_checks.{key} must be a positive number or null, got {value}")
        if self.replay_memory < 1:
            raise ValueError(f"strategy.update_checks.replay_memory must be at least 1, got {self.replay_memory}")


class UpdateGate:
    """The checks of one plaintext run; see the module docstring."""

    def __init__(self, limits: UpdateChecks, control: bool = False) -> None:
        self.limits = limits
        self.control = control  # SCAFFOLD: replies also carry the change of the bank's control variate
        self._sent: dict[str, np.ndarray] = {}
        self._seen: dict[str, str] = {}

    def sent(self, server_round: int, arrays: ArrayRecord) -> None:
        """Remember the global state sent for training in `server_round`."""
        self._sent = {name: array.numpy() for name, array in arrays.items()}
        self._remember(protocol.record_hash(arrays), f"the global state sent in round {server_round}")

    def accepted(self, content: RecordDict, bank: str, server_round: int) -> None:
        """Remember an aggregated update, so that it cannot be sent again."""
        arrays = content.array_records[protocol.ARRAYS]
        self._remember(protocol.record_hash(arrays), f"the update of {bank} in round {server_round}")

    def _remember(self, state_hash: str, what: str) -> None:
        """Keep the newest `replay_memory` states (a dict keeps insertion order: the first is the oldest)."""
        self._seen.setdefault(state_hash, what)
        while len(self._seen) > self.limits.replay_memory:
            del self._seen[next(iter(self._seen))]

    def check(self, content: RecordDict) -> tuple[str, float]:
        """Why this train reply must not be aggregated ("" if it may), and the norm of its update."""
        problem = _envelope(content, self.control)
        if problem:
            return problem, math.nan
        arrays = content.array_records[protocol.ARRAYS]
        replayed = self._seen.get(protocol.record_hash(arrays))
        if replayed:
            return f"replayed state: it is {replayed}", math.nan
        try:
            state = {name: array.numpy() for name, array in arrays.items()}
        except (ValueError, TypeError, EOFError) as error:
            return f"unreadable arrays: {error}", math.nan
        problem = _layout(state, self._sent) or _non_finite(state) or _control_change(content, self._sent)
        if problem:
            return problem, math.nan
        norm = update_norm(state, self._sent)
        if self.limits.max_norm is not None and norm > self.limits.max_norm:
            return f"update norm {norm:.4g} above strategy.update_checks.max_norm={self.limits.max_norm:g}", norm
        return "", norm

    def control_norm(self, content: RecordDict) -> float:
        """L2 norm of a SCAFFOLD reply's control variate change (NaN without one), checked like the state."""
        if protocol.CONTROL_UPDATE not in content.array_records:
            return math.nan
        return _l2(array.numpy() for array in content.array_records[protocol.CONTROL_UPDATE].values())

    def outliers(
        self,
        norms: Mapping[K, float],
        metric_keys: Mapping[K, frozenset[str]],
        control_norms: Mapping[K, float] | None = None,
    ) -> dict[K, str]:
        """The replies of a round (by any key) refused against the others, with the reason: odd metric keys,
        an update norm (or, with SCAFFOLD, a control variate change norm) far above the round's median."""
        refused = {key: f"metric keys {sorted(keys)} differ from the other banks'" for key, keys in _odd(metric_keys)}
        for what, values in (("update", norms), ("control variate change", control_norms or {})):
            refused |= _far_above_median(
                {key: norm for key, norm in values.items() if key not in refused and math.isfinite(norm)},
                self.limits.max_norm_ratio,
                what,
            )
        return refused

    def bound(self, content: RecordDict, bound: Bound, bank: str, server_round: int) -> None:
        """Apply `bound` to an accepted reply in place; the reply as sent is remembered as accepted."""
        self.accepted(content, bank, server_round)
        bound.apply(content, self._sent)

    def unregistered(self, bank: str) -> str:
        """Why `bank` may not be aggregated under the registry of example counts ("" if it may)."""
        registry = self.limits.registered_examples
        if not registry or bank in registry:
            return ""
        return (
            f"{bank} has no count in strategy.update_checks.registered_examples (registered: {_few(sorted(registry))})"
        )

    def count_caps(self, examples: Mapping[K, float], banks: Mapping[K, str]) -> dict[K, float]:
        """What the replies of a round (by any key; `banks`: their names) above a cap are weighed as instead
        of their count: the lower of `max_examples_ratio` x the round's median count (none from fewer than 3
        replies, as for `outliers`) and the bank's registered count. For train replies (their say in the
        aggregate) and evaluate replies alike (their say in the validation metrics, which pick the round
        publishing takes)."""
        enough = len(examples) >= MIN_REPLIES_FOR_RATIO
        median_cap = _cap(self.limits.max_examples_ratio, examples.values()) if enough else None
        capped = {}
        for key, count in examples.items():
            caps = [c for c in (median_cap, self.limits.registered_examples.get(banks[key])) if c is not None]
            if caps and count > min(caps):
                capped[key] = min(caps)
        return capped

    def bounds(
        self,
        norms: Mapping[K, float],
        examples: Mapping[K, float],
        banks: Mapping[K, str],
        control_norms: Mapping[K, float] | None = None,
    ) -> dict[K, Bound]:
        """How the accepted replies of a round (by any key; `banks`: their names) are bounded: against the
        round's medians (none from fewer than 3 replies, as for `outliers`) and each bank's registered
        count; with SCAFFOLD, the control variate change is clipped as the update is; only those changed."""
        ratios = len(norms) >= MIN_REPLIES_FOR_RATIO
        clip = self.limits.clip_norm_ratio if ratios else None
        norm_cap = _cap(clip, norms.values())
        controls = {key: norm for key, norm in (control_norms or {}).items() if math.isfinite(norm)}
        control_cap = _cap(clip, controls.values()) if controls else None
        counts = self.count_caps(examples, banks)
        bounded = {}
        for key, norm in norms.items():
            bound = Bound(_scale(norm, norm_cap), counts.get(key), _scale(controls.get(key, 0.0), control_cap))
            if bound != Bound():
                bounded[key] = bound
        return bounded


@dataclass(frozen=True)
class Bound:
    """How one accepted reply is bounded: its update scaled by `scale`, its count replaced by `examples`."""

    scale: float = 1.0
    examples: float | None = None
    control_scale: float = 1.0  # SCAFFOLD: the bank's control variate change scaled by this

    def apply(self, content: RecordDict, sent: Mapping[str, np.ndarray]) -> None:
        """Bound the reply in place: its state becomes sent + scale (state - sent), in its dtypes, and a
        control variate change control_scale times itself."""
        if self.scale < 1.0:
            arrays = content.array_records[protocol.ARRAYS]
            content[protocol.ARRAYS] = ArrayRecord(
                {name: Array(_scaled(array.numpy(), sent[name], self.scale)) for name, array in arrays.items()}
            )
        if self.control_scale < 1.0 and protocol.CONTROL_UPDATE in content.array_records:
            change = content.array_records[protocol.CONTROL_UPDATE]
            content[protocol.CONTROL_UPDATE] = ArrayRecord(
                {
                    name: Array(_scaled(array.numpy(), np.zeros(()), self.control_scale))
                    for name, array in change.items()
                }
            )
        if self.examples is not None:
            content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES] = self.examples


def _scaled(state: np.ndarray, sent: np.ndarray, scale: float) -> np.ndarray:
    if not np.issubdtype(state.dtype, np.floating):
        return state
    moved = sent.astype(np.float64) + scale * (state.astype(np.float64) - sent.astype(np.float64))
    return moved.astype(state.dtype)


def _scale(norm: float, cap: float | None) -> float:
    """What a norm above `cap` is multiplied by to meet it (1 when within it or without a cap)."""
    return cap / norm if cap is not None and norm > cap else 1.0


def _far_above_median(norms: Mapping[K, float], ratio: float | None, what: str) -> dict[K, str]:
    """The norms (by any key) above `ratio` times their median, with the reason (none from fewer than 3)."""
    if ratio is None or len(norms) < MIN_REPLIES_FOR_RATIO:
        return {}
    median = float(np.median(list(norms.values())))
    if median <= 0:
        return {}
    return {
        key: (
            f"{what} norm {norm:.4g} is {norm / median:.1f} x the round's median {median:.4g}, above "
            f"strategy.update_checks.max_norm_ratio={ratio:g}"
        )
        for key, norm in norms.items()
        if norm > ratio * median
    }


def _cap(ratio: float | None, values: Iterable[float]) -> float | None:
    """`ratio` times the median of `values` (None when off or the median is not positive)."""
    if ratio is None:
        return None
    median = float(np.median(list(values)))
    return ratio * median if median > 0 else None


def update_norm(state: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of `state - sent` over every tensor, in float64."""
    return _l2(state[n].astype(np.float64) - sent[n].astype(np.float64) for n in sent)


def _l2(arrays: Iterable[np.ndarray]) -> float:
    """The L2 norm of all the values of `arrays` together, in float64."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def non_finite(arrays: ArrayRecord) -> list[str]:
    """Names of the floating-point arrays holding a NaN or an infinity."""
    bad = []
    for name, array in arrays.items():
        values = array.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            bad.append(name)
    return bad


def _envelope(content: RecordDict, control: bool) -> str:
    """One state record (and with SCAFFOLD, `control`, one control variate change), one metric record
    with a positive finite example count."""
    expected = sorted([protocol.ARRAYS, protocol.CONTROL_UPDATE]) if control else [protocol.ARRAYS]
    if sorted(content.array_records) != expected:
        return f"expected the array records {expected}, got {sorted(content.array_records)}"
    if list(content.metric_records) != [protocol.METRICS]:
        return f"expected one metric record {protocol.METRICS!r}, got {sorted(content.metric_records)}"
    examples = content.metric_records[protocol.METRICS].get(protocol.NUM_EXAMPLES)
    if not isinstance(examples, int | float) or not math.isfinite(examples) or examples <= 0:
        return f"{protocol.NUM_EXAMPLES} must be a positive finite count, got {examples!r}"
    return ""


def _control_change(content: RecordDict, sent: Mapping[str, np.ndarray]) -> str:
    """SCAFFOLD's change of the bank's control variate, when the reply has one: the names and shapes
    of the state sent (float32, whatever the state's dtypes), finite."""
    if protocol.CONTROL_UPDATE not in content.array_records:
        return ""
    try:
        change = {name: array.numpy() for name, array in content.array_records[protocol.CONTROL_UPDATE].items()}
    except (ValueError, TypeError, EOFError) as error:
        return f"unreadable control variate change: {error}"
    like = {name: np.zeros(array.shape, dtype=np.float32) for name, array in sent.items()}
    problem = _layout(change, like) or _non_finite(change)
    return f"control variate change: {problem}" if problem else ""


def _layout(state: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> str:
    """The tensor names, shapes and dtypes of the state sent."""
    missing, unexpected = sorted(set(sent) - set(state)), sorted(set(state) - set(sent))
    if missing or unexpected:
        return f"tensor names differ from the state sent: missing {_few(missing)}, unexpected {_few(unexpected)}"
    for name, expected in sent.items():
        got = state[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            sent_as = f"{expected.dtype}{list(expected.shape)}"
            return f"tensor {name} is {got.dtype}{list(got.shape)}, the state sent has {sent_as}"
    return ""


def _non_finite(state: Mapping[str, np.ndarray]) -> str:
    counts = {name: int(np.size(values) - np.count_nonzero(np.isfinite(values))) for name, values in state.items()}
    bad = {name: count for name, count in counts.items() if count}
    if not bad:
        return ""
    return f"{sum(bad.values())} non-finite values (NaN or infinite) in {len(bad)} tensors: {_few(sorted(bad))}"


def _odd(keys: Mapping[K, frozenset[str]]) -> list[tuple[K, frozenset[str]]]:
    """The entries whose key set is not the most common one (the first seen wins a tie)."""
    if not keys:
        return []
    common = Counter(keys.values()).most_common(1)[0][0]
    return [(key, value) for key, value in keys.items() if value != common]


def _few(names: list[str], shown: int = 3) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
