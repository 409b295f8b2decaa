"""A bank's SuperNode identity: an EC key pair in OpenSSH format, as Flower reads it.

The private key never leaves the bank; the public key (`KEY.pub`) goes to the operator, who
registers it. Both sides compare the fingerprint over a second channel (phone, signed e-mail) so a
key swapped in transit is caught. Flower loads the private key without a passphrase, so the file
itself is the secret: it is written owner-only and refused when others can read it, as ssh does.
"""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fingpt_federated.privacy.atomic_file import write_new_owner_only


def write_secret_file(path: Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write a key file that is owner-only from its first byte; refuse to replace one unless `overwrite`."""
    return write_new_owner_only(path, data, overwrite=overwrite, what="overwrite a key (pass --force to replace it)")


def check_owner_only(path: Path) -> None:
    """Refuse a private key that group or others may read or write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"private key {path} has permissions {mode:o}; it must be readable by its owner only "
            f"(run: chmod 600 {path})"
        )


def public_key_path(private_key: Path) -> Path:
    return private_key.with_name(private_key.name + ".pub")


def generate_bank_keys(private_key: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create `private_key` (owner-only) and `private_key.pub`; return both paths.

    P-384 is the curve Flower itself generates for SuperNodes; `flwr supernode register` accepts
    any NIST curve, and this keeps the two consistent.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public = public_key_path(private_key)
    if public.exists() and not overwrite:
        raise FileExistsError(f"{public} exists; refusing to overwrite a key (pass --force to replace it)")
    write_secret_file(private_key, private_bytes, overwrite=overwrite)
    public.write_bytes(public_bytes + b"\n")
    return private_key, public


def load_bank_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The bank's private key, after checking its permissions and that Flower can use it."""
    if not path.is_file():
        raise FileNotFoundError(f"private key {path} not found (create one with: fingpt-client keygen --key {path})")
    check_owner_only(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an unencrypted OpenSSH private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; Flower needs an elliptic-curve (NIST) key")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A bank public key as `flwr supernode register` will read it (OpenSSH, NIST EC curve)."""
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}; Flower needs an elliptic-curve (NIST) key")
    return key


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH-style fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints it)."""
    blob = base64.b64decode(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
