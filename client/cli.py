"""`fingpt-client`: what a bank runs. `keygen` once, then `start` to join the consortium.

Encrypted federations (privacy=he): one bank runs `he-keygen` (the CKKS key ceremony) and gives
the secret context to every bank confidentially and the public one to the operator; every bank
starts with `--he-context` and `--binding-key`; after the run a bank turns the final encrypted
global into a plaintext state for publishing with `he-decrypt`.

After a run, `personalize` fine-tunes the bank's head on top of the published global model and keeps
it in the bank's state folder (or `--publish`es it) when it does better on the bank's validation split.

Exit codes: 0 done, 1 other failure, 2 invalid data or arguments, 3 server unreachable,
4 key refused (not registered), 5 TLS verification failed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from fingpt_federated.client.supernode import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_RUNTIME_PORT,
    DEFAULT_TASK_POLL_S,
    NodeSettings,
    NodeStartError,
    node_config_values,
    port_taken_message,
    probe_server,
    run_supernode,
    runtime_port_free,
)
from fingpt_federated.federation.node_keys import (
    fingerprint,
    generate_bank_keys,
    load_bank_private_key,
    load_public_key,
)
from fingpt_federated.model.train_config import TrainConfig
from fingpt_federated.privacy.update_binding import write_mac_key

EXIT_INVALID = 2
PERSONAL_MODEL_DIR = "personalised-model"
DEFAULT_TRAIN = TrainConfig()


def fail(message: str, code: int) -> int:
    print(f"fingpt-client: error: {message}", file=sys.stderr)
    return code


def cmd_keygen(args: argparse.Namespace) -> int:
    binding = args.key.with_name(args.key.name + ".binding")
    try:
        if binding.exists() and not args.force:
            raise FileExistsError(f"{binding} exists; refusing to overwrite a key (pass --force to replace it)")
        private, public = generate_bank_keys(args.key, overwrite=args.force)
        write_mac_key(binding, overwrite=args.force)
    except FileExistsError as exc:
        return fail(str(exc), EXIT_INVALID)
    print(f"private key: {private} (owner-only; never leaves this bank)")
    print(f"public key:  {public} (send it to the operator)")
    print(f"binding key: {binding} (owner-only; for encrypted runs, give it to the operator confidentially)")
    print(f"fingerprint: {fingerprint(load_public_key(public))} (read it to the operator over a second channel)")
    return 0


def cmd_he_keygen(args: argparse.Namespace) -> int:
    """The federation's CKKS key ceremony, with the parameters of conf/privacy/he.yaml."""
    from fingpt_federated.conf import CONFIG_DIR
    from fingpt_federated.privacy.he_config import he_block_of_file
    from fingpt_federated.privacy.he_context import HEParams, key_ceremony

    try:
        he_block = he_block_of_file(args.config or CONFIG_DIR / "privacy" / "he.yaml")
        files = key_ceremony(HEParams.from_config(he_block), args.out, overwrite=args.force)
    except (FileExistsError, ValueError) as exc:
        return fail(str(exc), EXIT_INVALID)
    print(f"secret context: {files.secret} (owner-only; copy it to every bank confidentially, never to the operator)")
    print(f"public context: {files.public} (give this one to the operator: fingpt-server run --he-public-context)")
    print(f"fingerprint:    {files.fingerprint} (compare it with the operator and the banks over a second channel)")
    return 0


def cmd_he_decrypt(args: argparse.Namespace) -> int:
    """Decrypt the final encrypted global into a bf16-rounded plaintext state for publishing."""
    from fingpt_federated.client.handover import decrypt_final_state, run_dir_files
    from fingpt_federated.privacy.he_context import ContextMismatchError

    try:
        if args.run_dir is not None:
            global_file, initial_file = run_dir_files(args.run_dir)
        elif args.global_file is not None and args.initial is not None:
            global_file, initial_file = args.global_file, args.initial
        else:
            return fail("give --run-dir, or --global and --initial", EXIT_INVALID)
        out = decrypt_final_state(global_file, initial_file, args.context, args.out)
    except (ContextMismatchError, ValueError, OSError) as exc:
        return fail(str(exc), EXIT_INVALID)
    print(f"plaintext global state (values rounded to bfloat16): {out}")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    """Fine-tune the bank's head on top of the published global model; keep (or publish) it if it does better."""
    from fingpt_federated.client.personal_model import personalise_published
    from fingpt_federated.client.personalization import PRIOR
    from fingpt_federated.client.state_folder import bank_state_dir

    out = args.publish or args.out or bank_state_dir(args.data, args.state_dir) / PERSONAL_MODEL_DIR
    try:
        train = TrainConfig(
            lr=args.lr, batch_size=args.batch_size, monitor=args.monitor, seed=args.seed, progress=False
        )
        done = personalise_published(
            args.model,
            args.data,
            out,
            train,
            steps=args.steps,
            label_prior=args.label_prior,
            variants=args.variants,
            expected_hash=args.model_hash,
            readable=args.publish is not None,
        )
    except (ValueError, KeyError, TypeError, OSError) as exc:  # a damaged model, bad data, an existing folder
        return fail(str(exc), EXIT_INVALID)
    result = done.personalization
    scores = f"{train.monitor} on the validation split: global {_metric(result.valid_global, train.monitor)}, "
    scores += f"personalised {_metric(result.valid_personalised, train.monitor)}"
    if done.out is None or done.card is None:
        print(f"bank {done.bank}: the global model stays the better one ({scores}); nothing written")
        return 0
    shared = "readable by others" if args.publish else "owner-only"
    if result.valid_prior is not None:
        scores += f", with the label prior only {_metric(result.valid_prior, train.monitor)}"
    kept = "head with its label prior" if result.choice == PRIOR else "personalised head"
    print(f"bank {done.bank}: {kept} kept ({scores}, {result.steps} steps, {result.seconds:.1f} s)")
    print(f"personalised model: {done.out} ({shared}, model hash {done.card['model_hash']}); serve it with")
    print(f"  fingpt-infer serve {done.out}")
    return 0


def _metric(metrics: dict[str, float] | None, monitor: str) -> str:
    return "not measured (no validation split)" if metrics is None else f"{metrics[monitor]:.4f}"


def node_options(args: argparse.Namespace) -> tuple[tuple[str, str | float | bool], ...]:
    """The optional node config a bank sets on `start`, as (key, value) in Flower's node-config names."""
    from fingpt_federated.federation import protocol

    given = {
        protocol.NODE_STATE_DIR: None if args.state_dir is None else str(args.state_dir),
        "dp-target-epsilon": args.dp_target_epsilon,
        "dp-delta": args.dp_delta,
        "dp-report-validation": args.dp_report_validation,
        protocol.NODE_HE_CONTEXT: None if args.he_context is None else str(args.he_context),
        protocol.NODE_BINDING_KEY: None if args.binding_key is None else str(args.binding_key),
    }
    return tuple((key, value) for key, value in given.items() if value is not None)


def validate_data(path: Path) -> str:
    """Load and validate the bank's data exactly as its ClientApp will, before any connection; its name."""
    from fingpt_federated.data.bank_data import (
        load_bank,  # heavy (pandas, pyarrow): only for `start`
    )

    bank = load_bank(path)
    valid = 0 if bank.valid is None else len(bank.valid)
    print(
        f"data ok: bank {bank.name!r}, {len(bank.train)} training and {valid} validation rows, "
        f"classes {bank.train.class_names}"
    )
    return bank.name


def cmd_start(args: argparse.Namespace) -> int:
    if args.insecure:
        print(
            "WARNING: --insecure: the connection is NOT encrypted and this node is NOT authenticated. "
            "Use only on a development machine.",
            file=sys.stderr,
        )
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
    if not 0.01 <= args.task_poll_s <= 60:
        return fail(f"--task-poll-s {args.task_poll_s} must be between 0.01 and 60 seconds", EXIT_INVALID)
    if not runtime_port_free(args.runtime_port):
        return fail(port_taken_message(args.runtime_port), EXIT_INVALID)
    settings = NodeSettings(
        server=args.server,
        ca_cert=None if args.insecure else args.ca,
        private_key=None if args.insecure else args.key,
        data_path=args.data,
        bank_name=bank_name,
        runtime_port=args.runtime_port,
        max_retries=args.max_retries,
        max_wait_s=args.max_wait,
        node_options=node_options(args),
        task_poll_s=args.task_poll_s,
    )
    try:
        probe_server(settings)
        if args.worker:
            run_with_worker(settings)
        else:
            print(f"reached the SuperLink at {args.server}; starting the SuperNode (no worker)")
            run_supernode(settings)
    except ValueError as exc:
        return fail(str(exc), EXIT_INVALID)
    except NodeStartError as exc:
        return fail(str(exc), exc.exit_code)
    return 0


def run_with_worker(settings: NodeSettings) -> None:
    """Start the bank's worker (supervised, restarted if it crashes), then the SuperNode that feeds it."""
    from fingpt_federated.client.worker_supervisor import WorkerSupervisor

    with WorkerSupervisor(node_config_values(settings)) as worker:
        print(
            f"reached the SuperLink at {settings.server}; bank worker on {worker.socket_path}; starting the SuperNode"
        )
        run_supernode(replace(settings, worker_socket=worker.socket_path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fingpt-client", description="A bank's side of the fingpt consortium.")
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="create this bank's SuperNode key pair")
    keygen.add_argument(
        "--key", type=Path, default=Path("bank.key"), help="private key path (KEY.pub is written beside it)"
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key pair")
    keygen.set_defaults(handler=cmd_keygen)

    start = commands.add_parser("start", help="validate the data, then run a SuperNode for it")
    start.add_argument("--server", required=True, help="the consortium's Fleet address, HOST:PORT")
    start.add_argument("--ca", type=Path, help="the consortium CA certificate (ca.crt)")
    start.add_argument("--key", type=Path, help="this bank's private key (from keygen)")
    start.add_argument("--data", type=Path, required=True, help="bank data config (.yaml) or a prepared bank folder")
    start.add_argument(
        "--runtime-port",
        type=int,
        default=DEFAULT_RUNTIME_PORT,
        help="loopback port for this node's ClientApp processes (unique per node on one machine)",
    )
    start.add_argument(
        "--max-retries", type=int, default=DEFAULT_MAX_RETRIES, help="connection retries before giving up"
    )
    start.add_argument(
        "--max-wait", type=float, default=DEFAULT_MAX_WAIT_S, help="seconds of retrying before giving up"
    )
    start.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (development only)")
    start.add_argument(
        "--state-dir", type=Path, help="where the bank keeps its privacy ledger (default: state/ beside its data)"
    )
    start.add_argument("--dp-target-epsilon", type=float, help="this bank's own DP budget for the run")
    start.add_argument("--dp-delta", type=float, help="this bank's own DP delta")
    start.add_argument(
        "--dp-report-validation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="under DP, whether this bank reports the global model's (un-noised) metrics on its "
        "validation split (default: the federation's privacy.dp.report_validation, off)",
    )
    start.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep torch, the model and the data in one long-lived worker process of this bank, which "
        "Flower's per-message ClientApp processes hand their messages to over a private Unix socket "
        "(default); --no-worker: every ClientApp process imports torch and builds the model itself",
    )
    start.add_argument(
        "--task-poll-s",
        type=float,
        default=DEFAULT_TASK_POLL_S,
        help="how often Flower's SuperExec asks the SuperNode for a message to run (Flower's default 1.0)",
    )
    start.add_argument("--he-context", type=Path, help="the federation's SECRET HE context (encrypted runs)")
    start.add_argument("--binding-key", type=Path, help="this bank's update-binding key, KEY.binding (encrypted runs)")
    start.set_defaults(handler=cmd_start)

    add_personalize(commands)

    he_keygen = commands.add_parser("he-keygen", help="create the federation's BFV or CKKS contexts (one bank, once)")
    he_keygen.add_argument(
        "--out", type=Path, required=True, help="folder for he_secret.ctx, he_public.ctx, fingerprint"
    )
    he_keygen.add_argument(
        "--config", type=Path, help="a privacy config with an `he:` block (default conf/privacy/he.yaml)"
    )
    he_keygen.add_argument("--force", action="store_true", help="replace an existing secret context")
    he_keygen.set_defaults(handler=cmd_he_keygen)

    he_decrypt = commands.add_parser("he-decrypt", help="decrypt the final encrypted global for publishing")
    he_decrypt.add_argument("--run-dir", type=Path, help="the run folder (global_state.he, initial_state.safetensors)")
    he_decrypt.add_argument(
        "--global", dest="global_file", type=Path, help="the final encrypted global (global_state.he)"
    )
    he_decrypt.add_argument("--initial", type=Path, help="the run's initial_state.safetensors (with --global)")
    he_decrypt.add_argument("--context", type=Path, required=True, help="the federation's secret context")
    he_decrypt.add_argument("--out", type=Path, required=True, help="the plaintext federated state (.safetensors)")
    he_decrypt.set_defaults(handler=cmd_he_decrypt)
    return parser


def add_personalize(commands: argparse._SubParsersAction) -> None:
    personal = commands.add_parser(
        "personalize", help="fine-tune this bank's head on the published global model; keep or publish it"
    )
    personal.add_argument("--model", type=Path, required=True, help="the published global model folder")
    personal.add_argument("--data", type=Path, required=True, help="bank data config (.yaml) or a prepared bank folder")
    personal.add_argument("--model-hash", help="the global model hash the operator announced; any other is refused")
    where = personal.add_mutually_exclusive_group()
    where.add_argument(
        "--out", type=Path, help=f"keep it here, owner-only (default: STATE_DIR/{PERSONAL_MODEL_DIR}); must not exist"
    )
    where.add_argument("--publish", type=Path, help="write it here readable by others (to serve it); must not exist")
    personal.add_argument("--state-dir", type=Path, help="the bank's state folder (default: state/ beside its data)")
    personal.add_argument("--steps", type=int, default=20, help="optimizer steps of the head's fine-tuning")
    personal.add_argument(
        "--label-prior",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="first shift the head's bias to this bank's label mix (one number per class, fitted on its train rows)",
    )
    personal.add_argument("--lr", type=float, default=DEFAULT_TRAIN.lr, help="learning rate")
    personal.add_argument("--batch-size", type=int, default=DEFAULT_TRAIN.batch_size, help="batch size")
    personal.add_argument(
        "--monitor",
        default=DEFAULT_TRAIN.monitor,
        help="validation metric that decides whether the head is kept (loss, accuracy, macro_f1, roc_auc)",
    )
    personal.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    personal.add_argument("--variants", nargs="+", help="variants to write (default: the global model's)")
    personal.set_defaults(handler=cmd_personalize)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
