"""Plain dicts of Hydra/OmegaConf config sections, typed for the code they are handed to.

`OmegaConf.to_container` is typed to return any container (dict, list, str or None); a section
such as `cfg.model` or `cfg.privacy.he` is a mapping by construction, and `config_dict` checks that
before handing it on as `dict[str, Any]`. It lives beside the subpackages so that every one of
them, `privacy` included (which imports no other box), can use it.
"""

from __future__ import annotations

from typing import Any, cast

from omegaconf import DictConfig, ListConfig, OmegaConf


def config_dict(node: DictConfig | ListConfig, *, resolve: bool = True) -> dict[str, Any]:
    """`node` as a plain dict (interpolations resolved unless `resolve=False`); a node that is not
    a mapping with string keys is a TypeError."""
    container = OmegaConf.to_container(node, resolve=resolve)
    if not isinstance(container, dict):
        raise TypeError(f"expected a config mapping, got {type(container).__name__}")
    if not all(isinstance(key, str) for key in container):
        raise TypeError(f"expected a config mapping with string keys, got keys {list(container)}")
    # Every key was just checked to be a str; mypy cannot narrow a dict's key type from that loop.
    return cast(dict[str, Any], container)
