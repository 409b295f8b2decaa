"""What a run federates over, written by whoever launches the run and read by both apps.

The ServerApp reads the task shape (classes, series features) and, in a simulation, the global
test set. In a simulation, where Flower gives every simulated node the same node config apart
from its `partition-id`, a bank's ClientApp also finds its own entry in `banks` here: the path
of its prepared data, and how much of each round's local work it completes (a straggler does
less, systems heterogeneity as in the FedProx paper). In a deployment `banks` is empty: a bank's
node config says where its data is (`data-path`) and, optionally, its `local-work`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class BankSite:
    """One simulated bank. `fail` makes its ClientApp raise (failure injection in simulations);
    `hostile` makes its train replies misbehave (client/hostile.py: "nan", "scale:100", ...; "": honest).
    A deployed bank's site comes from its node config, which sets neither.

    In an encrypted simulation `he_context` and `binding_key` are the bank's SECRET context and
    update-binding key (a deployed bank has them in its node config). Only the ClientApp reads them.
    """

    path: str
    name: str
    work: float = 1.0
    fail: bool = False
    hostile: str = ""
    he_context: str = ""
    binding_key: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.work <= 1:
            raise ValueError(f"bank {self.name}: work must be in (0, 1], got {self.work}")


@dataclass(frozen=True)
class FederationSpec:
    class_names: list[str]
    num_features: int
    test_dir: str | None = None
    banks: list[BankSite] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> FederationSpec:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        banks = [BankSite(**bank) for bank in raw.pop("banks", [])]
        return cls(**raw, banks=banks)
