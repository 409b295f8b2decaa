"""The operator's allow-list of bank keys, and keeping the SuperLink's registrations equal to it.

`WORKDIR/banks/NAME.pub` (and, for encrypted runs, `NAME.binding`: the bank's update-binding
MAC key, received confidentially) are the keys the operator accepted (after comparing fingerprints with each
bank over a second channel). The SuperLink's database remembers registrations across restarts, so
removing a file must also remove the registration: `registry.json` records which node id each
key received, and `sync` registers new keys and unregisters removed or replaced ones.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from fingpt_federated.federation.node_keys import fingerprint, load_public_key
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.update_binding import read_mac_key
from fingpt_federated.server.control import FlowerControl

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SyncReport:
    registered: list[str]
    unregistered: list[str]
    unchanged: list[str]


class BankRegistry:
    """The banks folder of an operator's working directory."""

    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / "banks"
        self.registry_path = self.folder / "registry.json"

    def add(self, public_key: Path, name: str | None = None) -> tuple[str, str]:
        """Accept a bank's public key under `name`; return (name, fingerprint)."""
        name = name or public_key.name.removesuffix(".pub")
        if not NAME_PATTERN.match(name):
            raise ValueError(f"bank name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        key_fingerprint = fingerprint(load_public_key(public_key))
        for other, other_fingerprint in self.fingerprints().items():
            if other_fingerprint == key_fingerprint and other != name:
                raise ValueError(f"this key is already accepted as bank {other!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(public_key, self.folder / f"{name}.pub")
        return name, key_fingerprint

    def add_binding_key(self, name: str, key_file: Path) -> Path:
        """Keep a bank's update-binding key (encrypted runs) as `NAME.binding`, owner-only."""
        key = read_mac_key(key_file)
        target = self.folder / f"{name}.binding"
        atomic_write_bytes(target, (key.hex() + "\n").encode("ascii"))
        return target

    def remove(self, name: str) -> None:
        path = self.folder / f"{name}.pub"
        if not path.is_file():
            raise FileNotFoundError(f"no bank named {name!r} in {self.folder}")
        path.unlink()
        (self.folder / f"{name}.binding").unlink(missing_ok=True)

    def keys(self) -> dict[str, Path]:
        return {path.name.removesuffix(".pub"): path for path in sorted(self.folder.glob("*.pub"))}

    def fingerprints(self) -> dict[str, str]:
        return {name: fingerprint(load_public_key(path)) for name, path in self.keys().items()}

    def node_ids(self) -> dict[str, int]:
        """The node id each registered bank received (as recorded at the last sync)."""
        return {name: int(entry["node_id"]) for name, entry in self._recorded().items()}

    def _recorded(self) -> dict[str, dict[str, str | int]]:
        if not self.registry_path.is_file():
            return {}
        return json.loads(self.registry_path.read_text(encoding="utf-8"))

    def _record(self, entries: dict[str, dict[str, str | int]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.registry_path.write_text(json.dumps(entries, indent=2, sort_keys=True), encoding="utf-8")

    def sync(self, control: FlowerControl) -> SyncReport:
        """Make the SuperLink's registered nodes exactly the accepted keys.

        A recorded node the SuperLink no longer knows (its database was deleted) is registered
        again rather than trusted.
        """
        recorded = self._recorded()
        current = self.fingerprints()
        live = {int(node["node-id"]) for node in control.nodes() if node.get("status") != "unregistered"}
        report = SyncReport([], [], [])
        for name, entry in sorted(recorded.items()):
            node_id = int(entry["node_id"])
            if current.get(name) != entry["fingerprint"] or node_id not in live:
                if node_id in live:
                    control.unregister(node_id)
                del recorded[name]
                self._record(recorded)
                report.unregistered.append(name)
        for name, key_fingerprint in current.items():
            if name in recorded:
                report.unchanged.append(name)
                continue
            node_id = control.register(self.keys()[name], name)
            recorded[name] = {"fingerprint": key_fingerprint, "node_id": node_id}
            self._record(recorded)
            report.registered.append(name)
        return report
