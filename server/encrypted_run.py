"""What the ServerApp needs for an encrypted run (`privacy.he.enabled`), read and checked up front.

- `privacy.he.public_context`: the ceremony's PUBLIC context; a context holding the secret key is
  refused (`SecretKeyRefused`), before any bank is contacted.
- `privacy.he.binding_keys`: the folder of the banks' registered update-binding keys,
  `NAME.binding` per bank (a deployment's `WORKDIR/banks`, a simulation's `he/bindings`). When that
  folder holds the operator's registry.json (a deployment), each bank's update must come from the
  Flower node registered for its name.

The run starts from the empty encrypted global (no aggregate yet: every bank uses the initial
state it rebuilds, whose hash is announced in the round config). The initial state is public (it
is built from the model config alone) and is written to `initial_state.safetensors`; the final
encrypted aggregate goes to `global_state.he`, which a key-holding bank turns into a plaintext
state with `fingpt-client he-decrypt`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig, OmegaConf

from fingpt_federated.federation import protocol
from fingpt_federated.federation.run_files import FINAL_CIPHERTEXT, INITIAL_STATE
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.he_context import HEContext, load_public_context
from fingpt_federated.privacy.update_binding import read_mac_key
from fingpt_federated.server.banks import BankRegistry
from fingpt_federated.server.checkpoint import save_state
from fingpt_federated.server.encrypted_aggregation import load_guard

GUARD_FILE = "he_replay_guard.json"
REGISTRY_NAME = "registry.json"
BANKS_FOLDER = "banks"
BINDING_SUFFIX = ".binding"


def he_enabled(cfg: DictConfig) -> bool:
    """Whether the run encrypts bank updates (`privacy.he.enabled`)."""
    return bool(OmegaConf.select(cfg, "privacy.he.enabled", default=False))


@dataclass(frozen=True)
class EncryptedRun:
    he: HEContext
    keys: dict[str, bytes]
    run_dir: Path
    initial_hash: str
    nodes: dict[str, int]

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: Path, initial: Mapping[str, torch.Tensor]) -> EncryptedRun | None:
        """None without HE; else the checked public context and keys (and the initial state written)."""
        if not he_enabled(cfg):
            return None
        he_cfg = cfg.privacy.he
        context_path, keys_dir = he_cfg.get("public_context"), he_cfg.get("binding_keys")
        if not context_path or not keys_dir:
            raise ValueError(
                "privacy.he.enabled needs privacy.he.public_context (the ceremony's he_public.ctx) "
                "and privacy.he.binding_keys (the folder of the banks' NAME.binding keys)"
            )
        he = load_public_context(Path(str(context_path)).expanduser())
        record = protocol.state_to_record(initial)
        save_state(record, run_dir / INITIAL_STATE, metadata={"fingerprint": he.fingerprint})
        folder = Path(str(keys_dir)).expanduser()
        return cls(he, binding_keys(folder), run_dir, protocol.record_hash(record), registered_nodes(folder))

    @property
    def run_label(self) -> str:
        """What updates are bound to: the run folder's name, the same across a resumed run."""
        return self.run_dir.resolve().name

    def strategy_kwargs(self) -> dict[str, Any]:
        guard_path = self.run_dir / GUARD_FILE
        guard = load_guard(guard_path, self.run_label, self.keys, self.nodes)
        return {"he": self.he, "guard": guard, "guard_path": guard_path}

    def round_config(self) -> dict[str, str]:
        return {
            protocol.HE_FINGERPRINT: self.he.fingerprint,
            protocol.HE_INITIAL_HASH: self.initial_hash,
            protocol.HE_RUN: self.run_label,
        }

    @staticmethod
    def initial_arrays() -> ArrayRecord:
        return ArrayRecord()

    def write_final(self, arrays: ArrayRecord) -> Path:
        """The last encrypted aggregate (empty file: no round was aggregated)."""
        path = self.run_dir / FINAL_CIPHERTEXT
        atomic_write_bytes(path, protocol.record_to_blob(arrays) or b"")
        return path


def binding_keys(folder: Path) -> dict[str, bytes]:
    """{bank name: MAC key} from `NAME.binding` files; an empty folder is an error, not a silent run."""
    keys = {
        path.name.removesuffix(BINDING_SUFFIX): read_mac_key(path) for path in sorted(folder.glob(f"*{BINDING_SUFFIX}"))
    }
    if not keys:
        raise ValueError(
            f"no update-binding keys (*{BINDING_SUFFIX}) in {folder}: register each bank's key "
            "(fingpt-server register-bank KEY.pub --binding-key KEY.binding)"
        )
    return keys


def registered_nodes(folder: Path) -> dict[str, int]:
    """{bank name: Flower node id} from the registry beside the keys (a deployment's WORKDIR/banks),
    empty where there is none (a simulation: the guard pins each name to its first node)."""
    if not (folder / REGISTRY_NAME).is_file():
        return {}
    return BankRegistry(folder.parent).node_ids() if folder.name == BANKS_FOLDER else {}
