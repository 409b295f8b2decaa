"""The operator's allow-list of bank keys, and keeping the SuperLink's registrations equal to it.

`WORKDIR/banks/NAME.pub` (and, for encrypted runs, `NAME.binding`: the bank's update-binding
MAC key, received confidentially) are the keys the operator accepted (after comparing fingerprints with each
bank over a second channel). The SuperLink's database remembers registrations across restarts, so
removing a file must also remove the registration: `registry.json` records which node id each
key received, and `sync` registers new keys and unregisters removed or replaced ones.

Flower never admits a key again once it was unregistered (the SuperLink keeps it, marked
"unregistered", and refuses it as "already in use"). So `registry.json` also records revoked keys, and a
revoked key is refused at `register-bank` with what to do instead. Renaming a bank keeps its key and
its node: `rename` moves the files and the record, and a key removed and accepted again under another
name before the next sync is recognised as the same node. Every write of `registry.json` is atomic, and a
command that fails leaves the files it touched as they were.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fingpt_federated.federation.node_keys import fingerprint, load_public_key
from fingpt_federated.privacy.atomic_file import atomic_write_bytes
from fingpt_federated.privacy.update_binding import read_mac_key
from fingpt_federated.server.control import ControlError, FlowerControl

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: "$" would let a final newline in
KEY_SUFFIXES = (".pub", ".binding")
PUBLIC_MODE = 0o644
REGISTRY_FORMAT = 2
UNREGISTERED = "unregistered"


class RegistryError(ValueError):
    """A registry command refused, with what to do instead."""


@dataclass
class SyncReport:
    registered: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)


@dataclass
class Recorded:
    """`registry.json`: the node of every registered bank, and the keys revoked at the SuperLink."""

    banks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {fingerprint, node_id}
    revoked: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> {name, node_id}

    def to_json(self) -> bytes:
        data = {"format": REGISTRY_FORMAT, "banks": self.banks, "revoked": self.revoked}
        return json.dumps(data, indent=2, sort_keys=True).encode("utf-8")


def checked_name(name: str) -> str:
    """A bank name, which is also a file name in the banks folder: nothing that could leave it."""
    if not NAME_PATTERN.fullmatch(name):
        raise RegistryError(f"bank name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    return name


def revoked_message(key_fingerprint: str, entry: dict[str, Any]) -> str:
    return (
        f"key {key_fingerprint} was revoked at the SuperLink as bank {entry['name']!r} (node {entry['node_id']}), "
        "and Flower never admits a revoked key again: the bank makes a new key (fingpt-client keygen) and you "
        "register that one; to rename a bank that is still accepted, use `fingpt-server rename-bank OLD NEW`"
    )


class BankRegistry:
    """The banks folder of an operator's working directory."""

    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / "banks"
        self.registry_path = self.folder / "registry.json"

    @staticmethod
    def name_for(public_key: Path, name: str | None) -> str:
        """The bank name a key is accepted under (default: the key file's name), checked."""
        return checked_name(name or public_key.name.removesuffix(".pub"))

    def add(self, public_key: Path, name: str | None = None) -> tuple[str, str]:
        """Accept a bank's public key under `name`; return (name, fingerprint)."""
        name = self.name_for(public_key, name)
        key = load_public_key(public_key)
        key_fingerprint = fingerprint(key)
        for other, other_fingerprint in self.fingerprints().items():
            if other_fingerprint == key_fingerprint and other != name:
                raise RegistryError(
                    f"this key is already accepted as bank {other!r} (to rename it: fingpt-server rename-bank "
                    f"{other} {name})"
                )
        revoked = self.load().revoked.get(key_fingerprint)
        if revoked is not None:
            raise RegistryError(revoked_message(key_fingerprint, revoked))
        atomic_write_bytes(self.folder / f"{name}.pub", public_key.read_bytes(), mode=PUBLIC_MODE)
        return name, key_fingerprint

    def add_binding_key(self, name: str, key_file: Path) -> Path:
        """Keep a bank's update-binding key (encrypted runs) as `NAME.binding`, owner-only."""
        key = read_mac_key(key_file)
        target = self.folder / f"{name}.binding"
        atomic_write_bytes(target, (key.hex() + "\n").encode("ascii"))
        return target

    def remove(self, name: str) -> None:
        path = self.folder / f"{checked_name(name)}.pub"
        if not path.is_file():
            raise RegistryError(f"no bank named {name!r} in {self.folder}")
        path.unlink()
        (self.folder / f"{name}.binding").unlink(missing_ok=True)

    def rename(self, old: str, new: str) -> None:
        """Accept bank `old`'s key (and binding key) as `new`: the same key and node, no SuperLink call."""
        if not (self.folder / f"{checked_name(old)}.pub").is_file():
            raise RegistryError(f"no bank named {old!r} in {self.folder}")
        if any((self.folder / f"{checked_name(new)}{suffix}").exists() for suffix in KEY_SUFFIXES):
            raise RegistryError(f"a bank named {new!r} already exists in {self.folder}")
        state = self.load()
        moved: list[tuple[Path, Path]] = []
        try:
            for suffix in KEY_SUFFIXES:
                source, target = self.folder / f"{old}{suffix}", self.folder / f"{new}{suffix}"
                if source.is_file():
                    os.replace(source, target)
                    moved.append((source, target))
            if old in state.banks:
                state.banks[new] = state.banks.pop(old)
                self.save(state)
        except BaseException:
            for source, target in reversed(moved):
                os.replace(target, source)
            raise

    @contextmanager
    def restored_on_failure(self, name: str) -> Iterator[None]:
        """Put bank `name`'s key files back as they were when the block fails (a refused command changes nothing).

        Unless the SuperLink already registered the new key under `name` before the failure: taking
        its file away would make the next sync revoke that key for good.
        """
        saved = {}
        for suffix in KEY_SUFFIXES:
            path = self.folder / f"{name}{suffix}"
            saved[path] = (path.read_bytes(), path.stat().st_mode & 0o777) if path.is_file() else None
        try:
            yield
        except BaseException:
            if not self._registered_as_is(name):
                for path, kept in saved.items():
                    if kept is None:
                        path.unlink(missing_ok=True)
                    else:
                        atomic_write_bytes(path, kept[0], mode=kept[1])
            raise

    def _registered_as_is(self, name: str) -> bool:
        path = self.folder / f"{name}.pub"
        try:
            entry = self.load().banks.get(name)
            return entry is not None and path.is_file() and entry["fingerprint"] == fingerprint(load_public_key(path))
        except (ValueError, OSError):
            return False

    def keys(self) -> dict[str, Path]:
        return {path.name.removesuffix(".pub"): path for path in sorted(self.folder.glob("*.pub"))}

    def fingerprints(self) -> dict[str, str]:
        return {name: fingerprint(load_public_key(path)) for name, path in self.keys().items()}

    def node_ids(self) -> dict[str, int]:
        """The node id each registered bank received (as recorded at the last sync)."""
        return {name: int(entry["node_id"]) for name, entry in self.load().banks.items()}

    def load(self) -> Recorded:
        """`registry.json` (also the flat {name: entry} files of earlier versions), checked."""
        if not self.registry_path.is_file():
            return Recorded()
        try:
            data = json.loads(self.registry_path.read_text(encoding="utf-8"))
            recorded = _parse(data)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise RegistryError(
                f"{self.registry_path} is damaged ({error}); restore it from a backup: it maps the accepted "
                "keys to their SuperLink nodes"
            ) from None
        return recorded

    def save(self, recorded: Recorded) -> None:
        atomic_write_bytes(self.registry_path, recorded.to_json())

    def sync(self, control: FlowerControl) -> SyncReport:
        """Make the SuperLink's registered nodes exactly the accepted keys.

        A recorded node the SuperLink no longer knows (its database was deleted) is registered
        again rather than trusted; revocations it no longer knows are forgotten. Each change is
        saved as soon as the SuperLink made it, so a failure midway leaves a true record.
        """
        state = self.load()
        current = self.fingerprints()
        nodes = control.nodes()
        known = {int(node["node-id"]) for node in nodes}
        live = {int(node["node-id"]) for node in nodes if node.get("status") != UNREGISTERED}
        state.revoked = {fp: entry for fp, entry in state.revoked.items() if int(entry["node_id"]) in known}
        report = SyncReport()
        self._follow_renames(state, current, live, report)
        self.save(state)
        for name, entry in sorted(state.banks.items()):
            node_id = int(entry["node_id"])
            if current.get(name) != entry["fingerprint"] or node_id not in live:
                if node_id in live:
                    control.unregister(node_id)
                    state.revoked[entry["fingerprint"]] = {"name": name, "node_id": node_id}
                del state.banks[name]
                self.save(state)
                report.unregistered.append(name)
        refused = []
        for name, key_fingerprint in current.items():
            if name in state.banks:
                report.unchanged.append(name)
            elif key_fingerprint in state.revoked:
                refused.append(f"bank {name!r}: {revoked_message(key_fingerprint, state.revoked[key_fingerprint])}")
            else:
                try:
                    node_id = self._register(control, name)
                except RegistryError as error:  # the others still get registered
                    refused.append(str(error))
                    continue
                state.banks[name] = {"fingerprint": key_fingerprint, "node_id": node_id}
                self.save(state)
                report.registered.append(name)
        if refused:
            raise RegistryError("; ".join(refused))
        return report

    @staticmethod
    def _follow_renames(state: Recorded, current: dict[str, str], live: set[int], report: SyncReport) -> None:
        """A registered key now accepted only under another name is the same bank renamed: it keeps its node."""
        names_of = {key_fingerprint: name for name, key_fingerprint in current.items()}
        for old, entry in sorted(state.banks.items()):
            new = names_of.get(entry["fingerprint"])
            if new and new != old and old not in current and new not in state.banks and int(entry["node_id"]) in live:
                state.banks[new] = state.banks.pop(old)
                report.renamed.append(f"{old} -> {new}")

    def _register(self, control: FlowerControl, name: str) -> int:
        try:
            return control.register(self.keys()[name], name)
        except ControlError as error:
            reason = " ".join(str(error).split())
            if "already in use" in reason:
                raise RegistryError(
                    f"bank {name!r}: the SuperLink already holds this key ({reason}), from an earlier registration "
                    "this registry does not record; the bank makes a new key (fingpt-client keygen)"
                ) from None
            raise


def _parse(data: Any) -> Recorded:
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    if isinstance(data.get("format"), int):
        recorded = Recorded(dict(data["banks"]), dict(data["revoked"]))
    else:  # written before revoked keys were recorded: {name: {fingerprint, node_id}}
        recorded = Recorded(dict(data))
    for name, entry in recorded.banks.items():
        if not NAME_PATTERN.fullmatch(name) or not isinstance(entry["fingerprint"], str):
            raise ValueError(f"bad entry for bank {name!r}")
        int(entry["node_id"])
    for key_fingerprint, entry in recorded.revoked.items():
        if not isinstance(key_fingerprint, str) or not isinstance(entry["name"], str):
            raise ValueError("bad revoked entry")
        int(entry["node_id"])
    return recorded


def authenticated_banks(folder: Path) -> dict[int, str]:
    """{node id: bank name} as `registry.json` in a deployment's banks folder recorded them when the run's
    services started. The SuperLink admits only these keys, so a reply's node id is authenticated and
    this is the name it answers for. A folder without a registry is an error, not a run that trusts every name."""
    registry = BankRegistry(folder.parent)
    if folder.name != registry.folder.name or not registry.registry_path.is_file():
        raise ValueError(
            f"federation.bank_registry={folder} is not an operator's banks folder with a {registry.registry_path.name} "
            "(WORKDIR/banks, written when fingpt-server run admits the banks)"
        )
    return {node_id: name for name, node_id in registry.node_ids().items()}
