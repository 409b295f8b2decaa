"""The `privacy.he` block: BFV or CKKS parameters (`HEParams`) plus where a run's contexts and keys live.

`HEConfig` is the schema of `privacy.he` (conf/schema.py) and, through `HEParams`, the only copy
of its defaults: conf/privacy/he.yaml only switches encryption on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fingpt_federated.privacy.he_context import HEParams
from fingpt_federated.structured_config import checked_dict, load_mapping


@dataclass
class HEConfig(HEParams):
    """Whether updates are encrypted, the ceremony's parameters, and the files of the run's side of it."""

    enabled: bool = False
    context_dir: str = "${oc.env:FINGPT_HE_DIR,'~/.fingpt/he'}"
    """Where the key ceremony writes he_secret.ctx (banks, mode 0600), he_public.ctx (operator) and
    he_context.sha256: outside the checkout by default, so a secret context is never committed (expand ~)."""
    public_context: str | None = None
    """The operator's he_public.ctx; a context with the secret key is refused (fingpt-sim points it into the
    run folder, where it holds the simulated banks' ceremony)."""
    binding_keys: str | None = None
    """Folder of the banks' registered update-binding keys, NAME.binding (fingpt-server run fills in
    WORKDIR/banks)."""


def he_block_of_file(path: Path) -> dict[str, Any]:
    """The `he:` block of a privacy config file (e.g. conf/privacy/he.yaml) over the defaults, checked
    and resolved: `HEParams.from_config` reads its parameters, `context_dir` says where keys go."""
    return checked_dict(HEConfig, load_mapping(path).get("he"), "privacy.he")
