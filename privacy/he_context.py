"""The federation's BFV or CKKS context: parameters, key ceremony, and loading with the right rights.

One key ceremony per federation creates two files from one TenSEAL context:

* the SECRET context (`he_secret.ctx`, mode 0600) holds the secret key. Every bank gets a copy
  over a confidential channel; it encrypts updates and decrypts aggregates. All banks share this
  one key (DESIGN.md): a bank colluding with the operator could decrypt other banks' updates,
  which stay protected by their own differential privacy.
* the PUBLIC context (`he_public.ctx`) holds only the parameters (and, for asymmetric encryption,
  the public key). The operator gets this one and can add ciphertexts but never decrypt them;
  `load_public_context` refuses a file that holds a secret key.

The fingerprint of a ceremony is the sha256 of its public file. It is printed and stored beside
the files (`he_context.sha256`) so that operator and banks can compare it over a second channel,
and every encrypted update carries it, so ciphertexts from another ceremony are refused before
they are added. A random ceremony id inside the public file makes two ceremonies with equal
parameters tell apart even with symmetric encryption, whose public file holds no key at all.

Both files are `MAGIC | u32 meta length | meta JSON (ceremony id, parameters) | TenSEAL bytes`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import stat
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tenseal as ts

from fingpt_federated.privacy.atomic_file import write_new_owner_only
from fingpt_federated.privacy.bfv_quantize import check_bfv_range

SECRET_NAME = "he_secret.ctx"
PUBLIC_NAME = "he_public.ctx"
FINGERPRINT_NAME = "he_context.sha256"

_MAGIC = b"FGHECTX\x01"
_LENGTH = struct.Struct("<I")
_ENCRYPTIONS = {"symmetric": ts.ENCRYPTION_TYPE.SYMMETRIC, "asymmetric": ts.ENCRYPTION_TYPE.ASYMMETRIC}


class SecretKeyRefused(ValueError):
    """The operator was handed a context that could decrypt bank updates."""


class ContextMismatchError(ValueError):
    """Two things that must come from the same key ceremony do not."""


SCHEMES = ("bfv", "ckks")
DEFAULT_MODULI = {"bfv": (54, 30), "ckks": (58, 20)}
"""Per scheme, the coefficient moduli when `coeff_mod_bit_sizes` is not set (measured: bench_he)."""
MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient modulus (bits, special prime included) for 128-bit classical security
with a ternary secret: the HomomorphicEncryption.org security standard (Albrecht et al. 2018,
Table 1, the 128-bit row), which SEAL's CoeffModulus::MaxBitCount also enforces."""


@dataclass
class HEParams:
    """Parameters of an add-only encrypted federation; the defaults are the federation's (privacy.he,
    whose schema `privacy.he_config.HEConfig` extends this class).
    Alternatives, measured: `python -m fingpt_federated.simulations.bench_he`.

    `scheme` picks the encryption: "bfv" (the default) quantizes each bank's weighted update to
    integers and sums them exactly, N values per ciphertext (privacy/bfv_quantize.py); "ckks" encrypts
    the floats, N/2 values per ciphertext, with approximate sums. Both need 128-bit security by the
    HE standard's table (`MAX_MODULUS_BITS_128`): N=4096 allows 109 bits of total modulus, and the
    defaults use 84 (BFV, 54+30) and 78 (CKKS, 58+20).

    The last modulus of `coeff_mod_bit_sizes` is SEAL's special prime: TenSEAL insists on
    creating relinearization keys, which need it, but fresh ciphertexts drop it, so only the
    other moduli travel and set the ciphertext size. `max_summands` bounds how many updates one
    aggregate may hold, so that each bank can check on its own that the sum cannot overflow.

    CKKS only: `global_scale_bits` (fixed-point scale) and `round_bits` (decrypted values are rounded
    to 2^-round_bits). BFV only: `plain_modulus` t (a prime = 1 mod 2N, for batching),
    `quantization_bound` (each bank clips |examples x value| to it) and `quantization_bits` (the
    integer step is 2^-quantization_bits; None: the finest step with which `max_summands` clipped
    updates cannot wrap around t). A setting whose sum could wrap is refused with the largest
    federation and bound it allows.
    """

    scheme: str = "bfv"
    poly_modulus_degree: int = 4096  # BFV: 4096 values per ciphertext; CKKS: 2048
    coeff_mod_bit_sizes: tuple[int, ...] | None = None  # None: DEFAULT_MODULI[scheme]; BFV (54, 30): only the
    #   54-bit prime travels (15.1 B/param, 3.8x fp32); CKKS (58, 20): 31.1 B/param
    global_scale_bits: int = 36  # CKKS: noise of a decrypted 10-bank sum ~2^-25; sums must stay below 2^20
    encryption: str = "symmetric"  # secret-key: 8x less noise than public-key, the operator's context holds no key
    max_summands: int = 64  # most updates in one aggregate
    round_bits: int = 22  # CKKS: decrypted means are rounded to multiples of 2^-22 (2.4e-7) before use
    plain_modulus: int = 1032193  # BFV: 20-bit prime, 1032193 = 1 mod 8192; sums live in +-516096
    quantization_bound: float = 2048.0  # BFV: |examples x drift| per value, e.g. 4096 examples x 0.5
    quantization_bits: int | None = None  # BFV: step 2^-bits; None: the finest that cannot wrap (2^-1 here)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"privacy.he.scheme must be one of {list(SCHEMES)}, got {self.scheme!r}")
        if self.coeff_mod_bit_sizes is None:
            self.coeff_mod_bit_sizes = DEFAULT_MODULI[self.scheme]
        n = self.poly_modulus_degree
        if n not in MAX_MODULUS_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS_128)}, got {n}")
        if len(self.coeff_mod_bit_sizes) < 2:
            raise ValueError(
                "coeff_mod_bit_sizes needs at least two moduli (data moduli + SEAL's special prime): "
                "TenSEAL creates relinearization keys, which a single modulus cannot support"
            )
        total = sum(self.coeff_mod_bit_sizes)
        if total > MAX_MODULUS_BITS_128[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes total {total} bits, above the {MAX_MODULUS_BITS_128[n]} that the HE security "
                f"standard allows at poly_modulus_degree {n} for 128-bit security"
            )
        if self.encryption not in _ENCRYPTIONS:
            raise ValueError(f"encryption must be one of {sorted(_ENCRYPTIONS)}, got {self.encryption!r}")
        if self.max_summands < 1:
            raise ValueError("max_summands must be at least 1")
        if self.scheme == "ckks":
            self._check_ckks()
        else:
            check_bfv_range(self)

    def _check_ckks(self) -> None:
        if not 1 <= self.global_scale_bits < self.data_modulus_bits - 1:
            raise ValueError(
                f"global_scale_bits {self.global_scale_bits} leaves no room below the data modulus "
                f"({self.data_modulus_bits} bits)"
            )
        if not 0 <= self.round_bits <= 52:
            raise ValueError("round_bits must be in 0..52 (float64 has 52 fraction bits)")

    @classmethod
    def from_config(cls, he: Mapping[str, Any]) -> HEParams:
        """Build from the `he` block of conf/privacy/he.yaml (extra keys such as `enabled` are ignored)."""
        fields = cls.__dataclass_fields__
        values = {key: he[key] for key in fields if key in he}
        if values.get("coeff_mod_bit_sizes") is not None:
            values["coeff_mod_bit_sizes"] = tuple(int(bits) for bits in values["coeff_mod_bit_sizes"])
        return cls(**values)

    @property
    def moduli(self) -> tuple[int, ...]:
        """`coeff_mod_bit_sizes`, resolved (never None after construction)."""
        assert self.coeff_mod_bit_sizes is not None
        return self.coeff_mod_bit_sizes

    @property
    def slots(self) -> int:
        """Values one ciphertext holds: N with BFV batching, N/2 with CKKS."""
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    @property
    def data_modulus_bits(self) -> int:
        """Bits of the modulus fresh ciphertexts live under (every modulus but the special prime)."""
        return sum(self.moduli[:-1])

    @property
    def sum_capacity(self) -> float:
        """Largest absolute slot value an aggregate may reach before it wraps around silently.

        CKKS: a slot holding x sits in the ciphertext as about x * 2^scale and must stay below half
        the data modulus; one more bit is kept as margin for encoding and noise. BFV: the integer
        sum must stay within +-(t-1)/2.
        """
        if self.scheme == "bfv":
            return float((self.plain_modulus - 1) // 2)
        return 2.0 ** (self.data_modulus_bits - self.global_scale_bits - 2)

    @property
    def update_bound(self) -> float:
        """Largest absolute weighted value (examples x value) one bank may send: CKKS refuses more,
        BFV clips to it. Either way a sum of `max_summands` updates fits."""
        if self.scheme == "bfv":
            return float(self.quantization_bound)
        return self.sum_capacity / self.max_summands


@dataclass(frozen=True)
class HEContext:
    """A loaded federation context, its parameters and the fingerprint of its ceremony."""

    context: ts.Context
    params: HEParams
    ceremony_id: str
    fingerprint: str

    @property
    def holds_secret_key(self) -> bool:
        return bool(self.context.is_private())

    def public(self) -> HEContext:
        """The operator's view of this context: same ceremony, no secret key."""
        body = _public_body(self.context, self.params)
        return HEContext(ts.context_from(body), self.params, self.ceremony_id, self.fingerprint)


@dataclass(frozen=True)
class CeremonyFiles:
    """Where a key ceremony wrote its output, and the fingerprint everyone should compare."""

    secret: Path
    public: Path
    fingerprint_file: Path
    fingerprint: str


def new_context(params: HEParams) -> HEContext:
    """Create a fresh secret context (a ceremony held in memory: simulations and tests)."""
    if params.scheme == "bfv":
        context = ts.context(
            ts.SCHEME_TYPE.BFV,
            poly_modulus_degree=params.poly_modulus_degree,
            plain_modulus=params.plain_modulus,
            coeff_mod_bit_sizes=list(params.moduli),
            encryption_type=_ENCRYPTIONS[params.encryption],
        )
    else:
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.moduli),
            encryption_type=_ENCRYPTIONS[params.encryption],
        )
        context.global_scale = 2.0**params.global_scale_bits
    ceremony_id = secrets.token_hex(16)
    meta = _meta_bytes(ceremony_id, params)
    fingerprint = hashlib.sha256(_container(meta, _public_body(context, params))).hexdigest()
    return HEContext(context, params, ceremony_id, fingerprint)


def key_ceremony(params: HEParams, out_dir: str | Path, *, overwrite: bool = False) -> CeremonyFiles:
    """Create the federation's context and write its secret file, public file and fingerprint.

    Refuses to replace an existing secret context unless `overwrite`: a new ceremony makes every
    ciphertext of the old one undecryptable.
    """
    he = new_context(params)
    out = Path(out_dir)
    meta = _meta_bytes(he.ceremony_id, params)
    secret_body = he.context.serialize(
        save_public_key=params.encryption == "asymmetric",
        save_secret_key=True,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    secret = write_new_owner_only(
        out / SECRET_NAME,
        _container(meta, secret_body),
        overwrite=overwrite,
        what="replace the federation's secret context",
    )
    public = out / PUBLIC_NAME
    public.write_bytes(_container(meta, _public_body(he.context, params)))
    fingerprint_file = out / FINGERPRINT_NAME
    fingerprint_file.write_text(f"{he.fingerprint}  {PUBLIC_NAME}\n", encoding="utf-8")
    return CeremonyFiles(secret, public, fingerprint_file, he.fingerprint)


def load_secret_context(path: str | Path, *, expected_fingerprint: str | None = None) -> HEContext:
    """Load a bank's secret context; refuse it when others may read it or it is not secret."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(
            f"secret HE context {path} has permissions {mode:o}; it must be readable by its owner only "
            f"(run: chmod 600 {path})"
        )
    he = _load(path)
    if not he.holds_secret_key:
        raise ValueError(f"{path} holds no secret key: it is a public context and cannot decrypt")
    _check_expected(he, expected_fingerprint, path)
    return he


def load_public_context(path: str | Path, *, expected_fingerprint: str | None = None) -> HEContext:
    """Load the operator's context; refuse any context that could decrypt."""
    path = Path(path)
    he = _load(path)
    if he.holds_secret_key or he.context.has_secret_key():
        raise SecretKeyRefused(
            f"{path} holds the federation's SECRET key; the operator must only ever get the public "
            f"context ({PUBLIC_NAME}). Delete this copy from the operator's machine."
        )
    _check_expected(he, expected_fingerprint, path)
    return he


def _load(path: Path) -> HEContext:
    meta, body = _split_container(path.read_bytes(), path)
    try:
        decoded = json.loads(meta)
        params = HEParams.from_config(decoded["params"])
        ceremony_id = str(decoded["ceremony_id"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: unreadable HE context metadata ({error})") from None
    if _meta_bytes(ceremony_id, params) != meta:
        raise ValueError(f"{path}: HE context metadata is not in canonical form (was the file edited?)")
    context = ts.context_from(body)
    if params.scheme == "ckks" and context.global_scale != 2.0**params.global_scale_bits:
        raise ValueError(f"{path}: context scale does not match global_scale_bits={params.global_scale_bits}")
    fingerprint = hashlib.sha256(_container(meta, _public_body(context, params))).hexdigest()
    return HEContext(context, params, ceremony_id, fingerprint)


def _check_expected(he: HEContext, expected: str | None, path: Path) -> None:
    if expected is not None and expected.strip().lower() != he.fingerprint:
        raise ContextMismatchError(
            f"{path} has fingerprint {he.fingerprint} but {expected} was expected: it comes from another key ceremony"
        )


def _public_body(context: ts.Context, params: HEParams) -> bytes:
    return context.serialize(
        save_public_key=params.encryption == "asymmetric",
        save_secret_key=False,
        save_galois_keys=False,
        save_relin_keys=False,
    )


def _meta_bytes(ceremony_id: str, params: HEParams) -> bytes:
    meta = {"ceremony_id": ceremony_id, "params": asdict(params)}
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _container(meta: bytes, body: bytes) -> bytes:
    return _MAGIC + _LENGTH.pack(len(meta)) + meta + body


def _split_container(data: bytes, path: Path) -> tuple[bytes, bytes]:
    head = len(_MAGIC) + _LENGTH.size
    if len(data) < head or not data.startswith(_MAGIC):
        raise ValueError(f"{path} is not an HE context file written by the key ceremony")
    (length,) = _LENGTH.unpack_from(data, len(_MAGIC))
    if len(data) < head + length:
        raise ValueError(f"{path} is truncated")
    return data[head : head + length], data[head + length :]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m privacy.he_context [OUT_DIR]`: run a key ceremony with the he.yaml parameters."""
    parser = argparse.ArgumentParser(description="Create the federation's HE context (key ceremony).")
    parser.add_argument("out_dir", type=Path, nargs="?", help="default: he.context_dir of the config")
    parser.add_argument(
        "--config", type=Path, help="a privacy config with an `he:` block (default: conf/privacy/he.yaml)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing secret context")
    args = parser.parse_args(argv)
    from fingpt_federated.privacy.he_config import he_block_of_file  # it builds on HEParams, defined here

    config_path = args.config or Path(__file__).resolve().parent.parent / "conf" / "privacy" / "he.yaml"
    he_block = he_block_of_file(config_path)
    out_dir = args.out_dir or Path(str(he_block["context_dir"])).expanduser()
    files = key_ceremony(HEParams.from_config(he_block), out_dir, overwrite=args.force)
    print(f"secret context (give to every bank, confidentially): {files.secret}")
    print(f"public context (give to the operator):                {files.public}")
    print(f"fingerprint (compare over a second channel):          {files.fingerprint}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
