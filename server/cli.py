"""`fingpt-server`: what the consortium operator runs.

    fingpt-server init-ca --host fl.consortium.example      # once: CA + server certificate
    fingpt-server register-bank bank-a.pub                  # per bank, after comparing fingerprints
    fingpt-server run model=tiny_encoder federation.rounds=2   # Hydra overrides, as fingpt-sim

Everything lives in one working directory (`--workdir`, default ./consortium): tls/, banks/,
the SuperLink database, logs and runs/. Exit codes: 0 completed, 1 run failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import signal
import socket
import sys
from pathlib import Path

from omegaconf import DictConfig

from fingpt_federated.server.banks import BankRegistry, SyncReport
from fingpt_federated.server.certificates import (
    TlsFiles,
    certificate_names,
    create_ca,
    create_server_certificate,
)
from fingpt_federated.server.control import ControlError, FlowerControl, connection_port
from fingpt_federated.server.superlink import (
    DEFAULT_CONTROL_PORT,
    DEFAULT_FLEET_PORT,
    LOOPBACK,
    OperatorSettings,
    port_open,
    raise_keyboard_interrupt,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
INSECURE_BANNER = """
**********************************************************************
* WARNING: --insecure. TLS is OFF and SuperNode authentication is OFF:
* updates travel in plaintext and ANY machine that reaches the fleet
* port can join as a bank. Local development only.
**********************************************************************
"""


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"fingpt-server: error: {message}", file=sys.stderr)
    return code


def tls_folder(workdir: Path) -> Path:
    return workdir / "tls"


def cmd_init_ca(args: argparse.Namespace) -> int:
    folder = tls_folder(args.workdir)
    try:
        create_ca(folder, overwrite=args.force)
        files = create_server_certificate(folder, args.host, overwrite=args.force)
    except FileExistsError as exc:
        return fail(str(exc), EXIT_USAGE)
    print(f"CA certificate:     {files.ca_cert}  (give this file to every bank)")
    print(f"CA key:             {folder / 'ca.key'}  (owner-only; keep it offline when not issuing)")
    print(f"server certificate: {files.server_cert} for {certificate_names(files.server_cert)}")
    return 0


def cmd_server_cert(args: argparse.Namespace) -> int:
    files = create_server_certificate(tls_folder(args.workdir), args.host, overwrite=True)
    print(f"server certificate: {files.server_cert} for {certificate_names(files.server_cert)}")
    return 0


def one_line(error: BaseException) -> str:
    """An error as one line (the `flwr` CLI's messages span several)."""
    return " ".join(str(error).split())


def cmd_register_bank(args: argparse.Namespace) -> int:
    """Accept a key; when the SuperLink is up, register it at once. A refused command changes nothing."""
    registry = BankRegistry(args.workdir)
    try:
        name = registry.name_for(args.public_key, args.name)
        with registry.restored_on_failure(name):
            name, key_fingerprint = registry.add(args.public_key, name)
            binding = None if args.binding_key is None else registry.add_binding_key(name, args.binding_key)
            report = _sync_if_running(args.workdir, registry)
    except (ValueError, OSError) as exc:  # RegistryError is a ValueError
        return fail(one_line(exc), EXIT_USAGE)
    except ControlError as exc:
        return fail(f"the SuperLink refused: {one_line(exc)}; bank {args.public_key} was not accepted")
    print(f"accepted bank {name!r}, key fingerprint {key_fingerprint}")
    if binding is not None:
        print(f"update-binding key kept as {binding} (encrypted runs); delete the copy you received")
    print("compare the fingerprint with the bank over a second channel before the run")
    _print_sync(report)
    return 0


def cmd_remove_bank(args: argparse.Namespace) -> int:
    registry = BankRegistry(args.workdir)
    try:
        registry.remove(args.name)
    except (ValueError, OSError) as exc:
        return fail(one_line(exc), EXIT_USAGE)
    print(f"removed bank {args.name!r} from the accepted keys")
    try:
        report = _sync_if_running(args.workdir, registry)
    except (ValueError, OSError, ControlError) as exc:
        return fail(
            f"the running SuperLink still admits bank {args.name!r}: {one_line(exc)}; "
            "run `fingpt-server remove-bank` again or restart `fingpt-server run`, which revokes it at start-up"
        )
    if report is None:
        print("its registration is revoked when `fingpt-server run` next starts the SuperLink")
    _print_sync(report)
    return 0


def cmd_rename_bank(args: argparse.Namespace) -> int:
    """Same key, same node, new name: what an encrypted run needs when the registered and the data name differ."""
    registry = BankRegistry(args.workdir)
    try:
        registry.rename(args.old, args.new)
        key_fingerprint = registry.fingerprints()[args.new]
    except (ValueError, OSError) as exc:
        return fail(one_line(exc), EXIT_USAGE)
    node = registry.node_ids().get(args.new, "(not yet registered)")
    print(f"renamed bank {args.old!r} to {args.new!r}: same key {key_fingerprint}, node {node}")
    return 0


def _sync_if_running(workdir: Path, registry: BankRegistry) -> SyncReport | None:
    """Apply the allow-list at once when this workdir's SuperLink is up; else `run` does at start-up."""
    flwr_home = OperatorSettings(workdir, None).flwr_home
    port = connection_port(flwr_home)
    if port is not None and port_open(LOOPBACK, port):
        return registry.sync(FlowerControl(flwr_home))
    return None


def _print_sync(report: SyncReport | None) -> None:
    if report is not None:
        print(
            f"SuperLink updated: registered {report.registered}, unregistered {report.unregistered}, "
            f"renamed {report.renamed}"
        )


def cmd_banks(args: argparse.Namespace) -> int:
    registry = BankRegistry(args.workdir)
    try:
        recorded = registry.load()
        accepted = registry.fingerprints()
    except (ValueError, OSError) as exc:
        return fail(one_line(exc), EXIT_USAGE)
    for name, key_fingerprint in accepted.items():
        entry = recorded.banks.get(name)
        node = entry["node_id"] if entry and entry["fingerprint"] == key_fingerprint else "(not yet registered)"
        print(f"{name}\t{key_fingerprint}\tnode {node}")
    for key_fingerprint, entry in sorted(recorded.revoked.items()):
        print(f"revoked: {entry['name']}\t{key_fingerprint}\tnode {entry['node_id']} (never admitted again)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.insecure:
        print(INSECURE_BANNER, file=sys.stderr)
        tls = None
    else:
        tls = TlsFiles.in_folder(tls_folder(args.workdir))
        if tls.missing():
            return fail(
                f"TLS files {[str(p) for p in tls.missing()]} are missing: run `fingpt-server init-ca` "
                "first (or pass --insecure for local development)",
                EXIT_USAGE,
            )

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fingpt_federated.server.checkpoint import CheckpointCorrupt, CheckpointError
    from fingpt_federated.server.deployment import (  # torch: only for `run`
        RunFailed,
        RunRequest,
        execute,
        load_config,
    )
    from fingpt_federated.server.encrypted_run import he_enabled
    from fingpt_federated.server.strategy_config import check_strategy

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (args.run_dir or args.workdir / "runs" / stamp).resolve()
    settings = OperatorSettings(
        workdir=args.workdir,
        tls=tls,
        fleet_host=args.fleet_host,
        fleet_port=args.fleet_port,
        control_port=args.control_port,
    )
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # stop the run and the services on `kill` too
    try:
        cfg = load_config(args.overrides, run_dir)
        if args.from_round is not None:
            cfg.federation.resume_from_round = args.from_round
        encrypted_run_paths(cfg, args.he_public_context, args.workdir)
        if tls is not None:  # node authentication is on: bind each node to the name its key was registered as
            cfg.federation.bank_registry = str(BankRegistry(args.workdir).folder.resolve())
        check_strategy(cfg, he_enabled(cfg))
        check_checkpoints(run_dir, cfg.federation.get("resume_from_round"))
    except (HydraException, OmegaConfBaseException) as exc:
        return fail(f"config: {exc}", EXIT_USAGE)
    except CheckpointCorrupt as exc:
        return fail(str(exc))
    except (ValueError, OSError, CheckpointError) as exc:  # SecretKeyRefused is a ValueError
        return fail(str(exc), EXIT_USAGE)
    try:
        summary = execute(settings, RunRequest(run_dir, cfg, args.test_data, args.bank_wait))
    except RunFailed as exc:
        return fail(str(exc))
    except (ValueError, TimeoutError, RuntimeError, OSError) as exc:
        return fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return fail(f"interrupted; the run was stopped (resume with --run-dir {run_dir})", 130)
    print(f"run {summary['run_id']} completed in {summary['seconds']:.1f}s")
    print(f"final state: {summary['final_state']}")
    print(f"metrics:     {summary['metrics']}")
    return 0


def check_checkpoints(run_dir: Path, from_round: int | None) -> None:
    """Before any service starts: the checkpoint the run would resume from (the newest, or `from_round`) passes
    every integrity check, else CheckpointCorrupt names the file and the intact rounds to resume from."""
    from fingpt_federated.server.app import CHECKPOINTS
    from fingpt_federated.server.checkpoint import Checkpointer

    if from_round is not None and not (run_dir / CHECKPOINTS).is_dir():
        raise ValueError(f"--from-round {from_round}: {run_dir} holds no checkpoints (pass the run's --run-dir)")
    resumed = Checkpointer(run_dir / CHECKPOINTS, schema=None).check_resume(from_round)
    if resumed is not None:
        print(f"resuming after round {resumed.server_round}: checkpoint verified (sha256 of every file, finite)")


def encrypted_run_paths(cfg: DictConfig, public_context: Path | None, workdir: Path) -> None:
    """With privacy.he on: the public context (flag, else config) is required and checked to hold no
    secret key before anything starts; the banks' binding keys default to WORKDIR/banks."""
    from fingpt_federated.server.encrypted_run import he_enabled

    if not he_enabled(cfg):
        return
    from fingpt_federated.privacy.he_context import load_public_context

    he = cfg.privacy.he
    path = public_context or (Path(str(he.public_context)).expanduser() if he.get("public_context") else None)
    if path is None:
        raise ValueError("privacy.he is on: pass --he-public-context he_public.ctx (from the banks' he-keygen)")
    context = load_public_context(path)
    he.public_context = str(path.resolve())
    if not he.get("binding_keys"):
        he.binding_keys = str(BankRegistry(workdir).folder)
    print(f"encrypted run: public context {path} (fingerprint {context.fingerprint})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fingpt-server", description="The consortium operator's side.")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument(
            "--workdir", type=Path, default=Path("consortium"), help="operator state (default ./consortium)"
        )
        sub.set_defaults(handler=handler)
        return sub

    hosts_help = "a name or IP banks dial (repeatable); loopback names are always included"
    init_ca = command("init-ca", "create the consortium CA and the server certificate", cmd_init_ca)
    init_ca.add_argument("--host", action="append", default=None, help=hosts_help)
    init_ca.add_argument(
        "--force", action="store_true", help="replace an existing CA (every bank needs the new ca.crt)"
    )

    server_cert = command("server-cert", "re-issue the server certificate with the existing CA", cmd_server_cert)
    server_cert.add_argument("--host", action="append", default=None, help=hosts_help)

    register = command(
        "register-bank", "accept a bank's public key (KEY.pub from fingpt-client keygen)", cmd_register_bank
    )
    register.add_argument("public_key", type=Path)
    register.add_argument(
        "--name",
        help="bank name (default: the key file's name): the node answers for this bank only in runs over TLS, "
        "so use the name of the bank's data config",
    )
    register.add_argument(
        "--binding-key", type=Path, help="the bank's KEY.binding (encrypted runs; received confidentially)"
    )

    remove = command(
        "remove-bank", "revoke a bank's key (for good: the SuperLink never admits it again)", cmd_remove_bank
    )
    remove.add_argument("name")

    rename = command("rename-bank", "accept a bank's key under a new name (same key, same node)", cmd_rename_bank)
    rename.add_argument("old")
    rename.add_argument("new")

    command("banks", "list accepted banks with fingerprints and node ids", cmd_banks)

    run = command("run", "start the SuperLink, run the federation to its end, stop", cmd_run)
    run.add_argument("--run-dir", type=Path, help="outputs; an existing one with checkpoints is resumed")
    run.add_argument(
        "--from-round",
        type=int,
        metavar="N",
        help="resume --run-dir from its intact checkpoint of round N; later checkpoints are moved to "
        "checkpoints/abandoned-TIME/ (federation.resume_from_round)",
    )
    run.add_argument("--fleet-host", default="0.0.0.0", help="where banks connect (default all interfaces)")
    run.add_argument("--fleet-port", type=int, default=DEFAULT_FLEET_PORT)
    run.add_argument(
        "--control-port",
        type=int,
        default=DEFAULT_CONTROL_PORT,
        help="the SuperLink's own port; bound to 127.0.0.1 only",
    )
    run.add_argument("--test-data", type=Path, help="the operator's held-out test set (data config or prepared folder)")
    run.add_argument("--bank-wait", type=float, default=600.0, help="seconds to wait for enough banks online")
    run.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (development only)")
    run.add_argument(
        "--he-public-context",
        type=Path,
        help="the ceremony's he_public.ctx (privacy=he); a context holding the secret key is refused",
    )
    run.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny_encoder federation.rounds=2")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.workdir = args.workdir.resolve()
    if not args.workdir.exists():  # it will hold the CA key, the database and the logs
        args.workdir.mkdir(mode=0o700, parents=True)
    if getattr(args, "host", "unset") is None:
        args.host = [socket.getfqdn()]
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
