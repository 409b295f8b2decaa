"""`fingpt-client`: what a bank runs. `keygen` once, then `start` to join the consortium.

Exit codes: 0 done, 1 other failure, 2 invalid data or arguments, 3 server unreachable,
4 key refused (not registered), 5 TLS verification failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.keys import fingerprint, generate_bank_keys, load_bank_private_key, load_public_key
from client.supernode import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_RUNTIME_PORT,
    NodeSettings,
    NodeStartError,
    probe_server,
    run_supernode,
)

EXIT_INVALID = 2


def fail(message: str, code: int) -> int:
    print(f"fingpt-client: error: {message}", file=sys.stderr)
    return code


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        private, public = generate_bank_keys(args.key, overwrite=args.force)
    except FileExistsError as exc:
        return fail(str(exc), EXIT_INVALID)
    print(f"private key: {private} (owner-only; never leaves this bank)")
    print(f"public key:  {public} (send it to the operator)")
    print(f"fingerprint: {fingerprint(load_public_key(public))} (read it to the operator over a second channel)")
    return 0


def validate_data(path: Path) -> str:
    """Load and validate the bank's data exactly as its ClientApp will, before any connection; its name."""
    from client.bank_data import load_bank  # heavy (pandas, pyarrow): only for `start`

    bank = load_bank(path)
    valid = 0 if bank.valid is None else len(bank.valid)
    print(f"data ok: bank {bank.name!r}, {len(bank.train)} training and {valid} validation rows, "
          f"classes {bank.train.class_names}")
    return bank.name


def cmd_start(args: argparse.Namespace) -> int:
    if args.insecure:
        print("WARNING: --insecure: the connection is NOT encrypted and this node is NOT authenticated. "
              "Use only on a development machine.", file=sys.stderr)
    elif args.ca is None or args.key is None:
        return fail("--ca and --key are required (or --insecure for local development)", EXIT_INVALID)
    try:
        bank_name = validate_data(args.data)
    except (ValueError, KeyError, TypeError, OSError) as exc:  # DataError is a ValueError
        return fail(f"invalid data, not connecting: {exc}", EXIT_INVALID)
    if not args.insecure:
        try:
            key = load_bank_private_key(args.key)
            if not args.ca.is_file():
                raise FileNotFoundError(f"CA certificate {args.ca} not found")
        except (ValueError, OSError) as exc:
            return fail(str(exc), EXIT_INVALID)
        print(f"node key fingerprint: {fingerprint(key.public_key())}")
    settings = NodeSettings(
        server=args.server,
        ca_cert=None if args.insecure else args.ca,
        private_key=None if args.insecure else args.key,
        data_path=args.data,
        bank_name=bank_name,
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        max_wait_s=args.max_wait,
    )
    try:
        probe_server(settings)
        print(f"reached the SuperLink at {args.server}; starting the SuperNode")
        run_supernode(settings)
    except ValueError as exc:
        return fail(str(exc), EXIT_INVALID)
    except NodeStartError as exc:
        return fail(str(exc), exc.exit_code)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fingpt-client", description="A bank's side of the fingpt consortium.")
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="create this bank's SuperNode key pair")
    keygen.add_argument("--key", type=Path, default=Path("bank.key"), help="private key path (KEY.pub is written beside it)")
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(handler=cmd_keygen)

    start = commands.add_parser("start", help="validate the data, then run a SuperNode for it")
    start.add_argument("--server", required=True, help="the consortium's Fleet address, HOST:PORT")
    start.add_argument("--ca", type=Path, help="the consortium CA certificate (ca.crt)")
    start.add_argument("--key", type=Path, help="this bank's private key (from keygen)")
    start.add_argument("--data", type=Path, required=True, help="bank data config (.yaml) or a prepared bank folder")
    start.add_argument("--runtime-port", type=int, default=DEFAULT_RUNTIME_PORT,
                       help="loopback port for this node's ClientApp processes (unique per node on one machine)")
    start.add_argument("--max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="connection retries before giving up")
    start.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT_S, help="seconds of retrying before giving up")
    start.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (development only)")
    start.set_defaults(handler=cmd_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
