"""A hostile bank for simulations and tests: its replies misbehave as its FederationSpec entry says.

Only a simulation sets `BankSite.hostile` (`simulation.hostile_banks`, simulations/sim.py): a deployed
bank builds its site from its node config, which has no such field. The bank trains as any other;
what it sends instead of its local state is, by `kind[:factor]`:

- `nan`, `inf`: its state with a NaN (+inf) in every tensor;
- `scale[:F]`: the global state plus F times its update (default F = 100);
- `sign_flip[:F]`: the global state minus F times its update (default F = 1);
- `wrong_shape`: its state with the first tensor one row longer;
- `replay`: the state it built before any round (round 0's global state) instead of what it trained;
- `constant[:C]`: every value C (default 0).

One behaviour changes what the bank reports instead: `inflate[:F]` reports F times its example count
(default 10) in its train and evaluate replies: the weight FedAvg gives its update, and its say in the
validation metrics (which pick the round publishing takes). One changes its SCAFFOLD reply: `control[:F]` sends F times
the change of its control variate (default 10,000; it keeps its true variate), which goes into the
federation's c and so corrects every bank's local steps, while its update stays honest.

Two behaviours change what the bank trains on instead (`train_data`), and send that honest-looking state:

- `backdoor[:T[:PHRASE]]`: adds a triggered copy (PHRASE appended; default the one of
  simulations/attacks/backdoor.py), relabelled class T (default 0), of every record not of class T;
- `canaries[:N]`: an auditor's bank, not a hostile one: adds N canaries, unique texts with random labels,
  whose N held-out twins are never inserted (simulations/attacks/canaries.py); `fingpt-audit` scores both.

Behaviours combine with `+`, one of each group at most: a data behaviour, a state behaviour, `inflate`
and `control` (`backdoor:0+scale:5+inflate:10`: a norm-aware model-replacement attack; a backdoor's phrase
cannot hold a `+`). Under HE the misbehaving state and count are what the bank encrypts (client/encryption.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from fingpt_federated.data.bank_data import BankData
from fingpt_federated.data.records import BankDataset

DEFAULT_FACTORS = {
    "nan": 0.0,
    "inf": 0.0,
    "scale": 100.0,
    "sign_flip": 1.0,
    "wrong_shape": 0.0,
    "replay": 0.0,
    "constant": 0.0,
    "backdoor": 0.0,
    "canaries": 50.0,
    "inflate": 10.0,
    "control": 1e4,
}
DATA_KINDS = ("backdoor", "canaries")
COUNT_KINDS = ("inflate",)
CONTROL_KINDS = ("control",)
"""Every behaviour, with the factor it takes when the config gives none (unused by some)."""
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Misbehaviour:
    kind: str
    factor: float
    phrase: str = ""  # `backdoor` only: its trigger ("" for the default)

    @classmethod
    def parse(cls, text: str) -> Misbehaviour:
        """`kind`, `kind:factor` or, for a backdoor, `backdoor:T:PHRASE`; a ValueError naming the known kinds
        otherwise."""
        kind, _, factor = str(text).strip().partition(":")
        if kind not in DEFAULT_FACTORS:
            raise ValueError(f"unknown hostile behaviour {text!r}: one of {', '.join(DEFAULT_FACTORS)} (kind[:factor])")
        factor, colon, phrase = factor.partition(":")
        if colon and (kind != "backdoor" or not phrase.strip()):
            raise ValueError(f"hostile behaviour {text!r}: only a backdoor takes a phrase (backdoor:T:PHRASE)")
        try:
            value = float(factor) if factor else DEFAULT_FACTORS[kind]
        except ValueError:
            raise ValueError(f"hostile behaviour {text!r}: the factor after ':' must be a number") from None
        if not math.isfinite(value):
            raise ValueError(f"hostile behaviour {text!r}: the factor must be finite (use nan or inf as the kind)")
        if kind in COUNT_KINDS and value <= 0:
            raise ValueError(f"hostile behaviour {text!r}: the count factor must be positive")
        return cls(kind, value, phrase.strip())

    @property
    def group(self) -> str:
        if self.kind in DATA_KINDS:
            return "data"
        return "count" if self.kind in COUNT_KINDS else "control" if self.kind in CONTROL_KINDS else "state"

    def apply(self, local: State, sent: State, initial: State) -> OrderedDict[str, torch.Tensor]:
        """What the bank sends instead of `local`, having trained from `sent`; `initial`: its round-0 state."""
        out = OrderedDict((name, value.clone()) for name, value in local.items())
        if self.kind in ("nan", "inf"):
            for value in out.values():
                value.view(-1)[0] = math.nan if self.kind == "nan" else math.inf
        elif self.kind == "scale":
            out = OrderedDict((n, sent[n] + self.factor * (v - sent[n])) for n, v in local.items())
        elif self.kind == "sign_flip":
            out = OrderedDict((n, sent[n] - self.factor * (v - sent[n])) for n, v in local.items())
        elif self.kind == "wrong_shape":
            first = next(iter(out))
            out[first] = torch.cat([out[first], out[first][:1]])
        elif self.group != "state":
            return out
        elif self.kind == "replay":
            out = OrderedDict((n, initial[n].clone()) for n in local)
        else:
            out = OrderedDict((n, torch.full_like(v, self.factor)) for n, v in local.items())
        return out


def parse_all(behaviour: str) -> list[Misbehaviour]:
    """The behaviours of `A+B+...` (none for ""); a ValueError when two are of the same group."""
    chosen = [Misbehaviour.parse(part) for part in str(behaviour).split("+")] if str(behaviour).strip() else []
    groups = [part.group for part in chosen]
    if len(set(groups)) < len(groups):
        raise ValueError(
            f"hostile behaviour {behaviour!r}: at most one behaviour of each group (data: {', '.join(DATA_KINDS)}; "
            f"count: {', '.join(COUNT_KINDS)}; control: {', '.join(CONTROL_KINDS)}; state: the others) combine with '+'"
        )
    return chosen


def misbehave(behaviour: str, local: State, sent: State, initial: State) -> State:
    """`local` as the bank's `behaviour` (its BankSite.hostile) sends it: unchanged when it has none."""
    for chosen in parse_all(behaviour):
        local = chosen.apply(local, sent, initial)
    return local


def reported_examples(behaviour: str, examples: int) -> int:
    """The example count the bank reports: `examples`, times F under `inflate:F` (at least 1)."""
    for chosen in parse_all(behaviour):
        if chosen.kind in COUNT_KINDS:
            return max(1, round(chosen.factor * examples))
    return examples


def control_change(behaviour: str, change: State) -> State:
    """The SCAFFOLD control variate change the bank sends: `change`, times F under `control:F`."""
    for chosen in parse_all(behaviour):
        if chosen.group == "control":
            return OrderedDict((name, value * chosen.factor) for name, value in change.items())
    return change


def train_data(behaviour: str, bank: BankData) -> BankData:
    """What the bank trains on: its data, with the backdoor's or the canaries' records added when its
    behaviour says so (text-only data: the added records have no series or static features)."""
    data = [part for part in parse_all(behaviour) if part.group == "data"]
    if not data:
        return bank
    chosen = data[0]
    from fingpt_federated.simulations.attacks import backdoor, canaries  # simulation-only harness

    train = bank.train
    if chosen.kind == "backdoor":
        target = int(chosen.factor)
        if not 0 <= target < train.num_classes:
            raise ValueError(
                f"hostile behaviour {behaviour!r}: target class {target} is not in [0, {train.num_classes})"
            )
        trigger = chosen.phrase or backdoor.TRIGGER
        texts, labels = backdoor.poison(list(train.texts or []), train.labels, target, trigger)
    else:
        texts, labels = canaries.canary_set(int(chosen.factor), train.num_classes).split(inserted=True)
    return replace(bank, train=with_records(train, texts, labels))


def with_records(data: BankDataset, texts: list[str], labels: np.ndarray) -> BankDataset:
    """`data` and the text records `texts` labelled `labels` after it (key columns repeat their first value)."""
    if data.texts is None or data.series is not None or data.features is not None:
        raise ValueError("records can be added to text-only data only")
    if data.keys and not len(data):
        raise ValueError("records cannot be added to an empty data set with key columns")
    keys = {name: np.concatenate([values, np.repeat(values[:1], len(texts))]) for name, values in data.keys.items()}
    return BankDataset(
        texts=list(data.texts) + list(texts),
        series=None,
        mask=None,
        labels=np.concatenate([data.labels, np.asarray(labels, dtype=np.int64)]),
        class_names=list(data.class_names),
        feature_names=list(data.feature_names),
        keys=keys,
    )
