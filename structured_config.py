"""Config blocks as typed dataclasses: a mapping laid over a dataclass's defaults, checked, built.

The dataclasses of `data`, `model` and `privacy` are the schema that Hydra composes against
(conf/schema.py registers them) and hold the only copy of their defaults. Code that receives a
block outside Hydra (a bank's own data file, a round's settings off the wire, a test) builds it
here, so an unknown key or a wrong type fails the same way, naming the key. It lives beside the
subpackages so that each of them can use it without importing `conf` (which imports them).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def build(schema: type[T], values: Mapping[str, Any] | None, where: str) -> T:
    """`values` over the defaults of the dataclass `schema`, as a `schema` instance (its
    `__post_init__` checks run); an unknown key, a wrong type or a missing required value is a
    ValueError naming `where.key` (`where` may be "" for a root config)."""
    merged = _merged(schema, values, where)
    try:
        return cast(T, OmegaConf.to_object(merged))
    except OmegaConfBaseException as error:
        raise _named(error, where) from None


def load_mapping(path: Path) -> DictConfig:
    """A YAML file that must hold a mapping (a config block), unresolved."""
    loaded = OmegaConf.load(path)
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path} holds a list, not a config mapping")
    return loaded


def checked_dict(schema: type, values: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """`values` over the defaults of `schema`, checked as `build` does, as a plain resolved dict."""
    merged = _merged(schema, values, where)
    try:
        return cast(dict[str, Any], OmegaConf.to_container(merged, resolve=True, throw_on_missing=True))
    except OmegaConfBaseException as error:
        raise _named(error, where) from None


def _merged(schema: type, values: Mapping[str, Any] | None, where: str) -> DictConfig:
    if isinstance(values, DictConfig):  # resolved first: its interpolations may point outside the block
        values = cast(dict[str, Any], OmegaConf.to_container(values, resolve=True))
    try:
        return cast(DictConfig, OmegaConf.merge(OmegaConf.structured(schema), values or {}))
    except OmegaConfBaseException as error:
        raise _named(error, where) from None


def _named(error: OmegaConfBaseException, where: str) -> ValueError:
    key = ".".join(part for part in (where, str(error.full_key or "")) if part)
    reason = str(error.msg).splitlines()[0] if error.msg else type(error).__name__
    return ValueError(f"{key}: {reason}")
