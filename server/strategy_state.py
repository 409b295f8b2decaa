"""A Flower strategy's own state across a restart, for any strategy, without a class per strategy.

Some of Flower's strategies learn across rounds: FedAvgM keeps `momentum_vector` (a list of
arrays in the order of the state's arrays), the FedOpt family (FedAdam, FedYogi, FedAdagrad)
keeps `m_t` and `v_t` ({array name: array}). A resumed run must go on with them, not restart from
zero. `capture` reads every attribute of the strategy that holds numpy arrays (an array, a list of
arrays or a dict of arrays), and those of the strategies it wraps (any attribute that is a
`Strategy`, e.g. `strategy`), into flat safetensors-ready tensors; `restore` puts them back.

Skipped: `current_arrays`. Flower's strategies take it from the global state they are sent in
`configure_train` (FedOpt every round, FedAvgM when it has none), and the checkpoint holds that
state already; saving it would store the model a second time.

Keys: `PATH:KIND:ITEM`, PATH the attribute (`strategy/m_t` inside a wrapper), KIND `array`,
`list` (ITEM the index) or `dict` (ITEM the array name, which may hold any character).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

SKIPPED = frozenset({"current_arrays"})


def capture(strategy: Strategy) -> dict[str, np.ndarray]:
    """Every array-valued attribute of `strategy` and of the strategies it wraps, as flat tensors."""
    return {key: np.ascontiguousarray(value) for key, value in _tensors(strategy, "")}


def restore(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Set the attributes `capture` saved; refuse state the strategy does not keep (another strategy's)."""
    grouped: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    for key, tensor in state.items():
        path, kind, item = _split(key)
        grouped.setdefault(path, (kind, {}))[1][item] = tensor
    for path, (kind, items) in grouped.items():
        owner, name = _owner(strategy, path)
        setattr(owner, name, _value(kind, items))


def _tensors(strategy: Strategy, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    for name, value in vars(strategy).items():
        path = prefix + name
        if name in SKIPPED:
            continue
        if isinstance(value, Strategy):
            yield from _tensors(value, path + "/")
        elif isinstance(value, np.ndarray):
            yield f"{path}:array:", value
        elif isinstance(value, list | tuple) and value and all(isinstance(v, np.ndarray) for v in value):
            yield from ((f"{path}:list:{i}", v) for i, v in enumerate(value))
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())
        ):
            yield from ((f"{path}:dict:{k}", v) for k, v in value.items())


def _value(kind: str, items: dict[str, np.ndarray]) -> Any:
    if kind == "array":
        return items[""]
    if kind == "list":
        return [items[i] for i in sorted(items, key=int)]
    return dict(items)


def _split(key: str) -> tuple[str, str, str]:
    path, kind, item = (key.split(":", 2) + ["", ""])[:3]
    if kind not in ("array", "list", "dict") or (kind == "list" and not item.isdigit()):
        raise ValueError(
            f"server state {key!r} is not a strategy attribute (PATH:array|list|dict:ITEM); "
            "was the checkpoint written by another version?"
        )
    return path, kind, item


def _owner(strategy: Strategy, path: str) -> tuple[Any, str]:
    """The object that holds the attribute `path` names, and the attribute's name."""
    *wrappers, name = path.split("/")
    owner: Any = strategy
    for wrapper in wrappers:
        owner = getattr(owner, wrapper, None)
    if not isinstance(owner, Strategy) or not hasattr(owner, name) or name in SKIPPED:
        raise ValueError(
            f"the checkpoint holds server state {path!r}, which {type(strategy).__name__} does not keep: "
            "resume with the strategy the run was started with"
        )
    return owner, name
