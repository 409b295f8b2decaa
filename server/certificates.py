"""The consortium's TLS material: one CA that banks trust, and the server certificate it signs.

Banks receive only `ca.crt`; they verify the SuperLink's certificate against it, so the
server certificate must name every address the banks dial (its subject alternative names).
Loopback names are always added because the operator's own tools (the `flwr` CLI, Flower's
SuperExec and the fleet gateway) reach the SuperLink at 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fingpt_federated.federation.node_keys import write_secret_file

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 5 * 365
SERVER_DAYS = 397  # the longest lifetime browsers accept; rotation is a yearly routine


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA certificate and the server's certificate and key live."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        return cls(folder / "ca.crt", folder / "server.crt", folder / "server.key")

    def missing(self) -> list[Path]:
        return [path for path in (self.ca_cert, self.server_cert, self.server_key) if not path.is_file()]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # Back-date by an hour so a bank whose clock runs slightly behind still accepts the certificate.
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    return start, start + datetime.timedelta(days=days)


def create_ca(folder: Path, name: str = "fingpt consortium CA", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Create `ca.key` (owner-only, stays with the operator) and `ca.crt` (handed to banks)."""
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before, not_after = _validity(CA_DAYS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_path = write_secret_file(folder / "ca.key", _key_pem(key), overwrite=overwrite)
    cert_path = folder / "ca.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_server_certificate(folder: Path, hosts: list[str], *, overwrite: bool = False) -> TlsFiles:
    """Sign a server certificate for `hosts` (plus loopback) with the CA in `folder`."""
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{folder / 'ca.key'} is not an elliptic-curve key created by init-ca")
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    names = list(dict.fromkeys([*hosts, *LOOPBACK_NAMES]))
    key = _new_key()
    not_before, not_after = _validity(SERVER_DAYS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = TlsFiles.in_folder(folder)
    write_secret_file(files.server_key, _key_pem(key), overwrite=overwrite)
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def certificate_names(cert_path: Path) -> list[str]:
    """The subject alternative names of a certificate, for error messages and checks."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san]
