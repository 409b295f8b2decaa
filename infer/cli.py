"""`fingpt-infer`: publish a run's global model, predict on a file, serve over HTTP.

    fingpt-infer publish RUN_DIR [--state FILE] [--out DIR] [--variants fp32 bf16 ...]
    fingpt-infer predict MODEL_DIR INPUT [--variant fp32] [--out preds.jsonl] [--no-explain] [--mc-samples N]
    fingpt-infer serve MODEL_DIR [--variant fp32] [--host 127.0.0.1] [--port 8000] [--api-key-file FILE]
                       [--max-body-bytes N] [--max-records N] [--max-text-chars N] [--max-series-steps N]
                       [--max-mc-samples N] [--max-in-progress N] [--time-limit-s S]

Every prediction is appended to the audit log (`--audit-log`, default ./fingpt-audit.jsonl),
redacted. Exit codes: 0 done, 1 failed (bad input, damaged model), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from fingpt_federated.data.errors import DataError
from fingpt_federated.model.quantize import VARIANTS

EXIT_FAILED = 1
DEFAULT_AUDIT_LOG = "fingpt-audit.jsonl"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def fail(message: str) -> int:
    print(f"fingpt-infer: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def cmd_publish(args: argparse.Namespace) -> int:
    from fingpt_federated.server.publish import publish_run

    out, card = publish_run(args.run_dir, state=args.state, out=args.out, variants=args.variants, select=args.select)
    print(f"published {out} (model hash {card['model_hash']}), round {card['selection']['round']}")
    for name, variant in card["variants"].items():
        print(f"  {name:<13} {variant['bytes']:>14,} bytes  {variant['ratio_to_fp32']:.2f} x fp32")
    return 0


def open_service(args: argparse.Namespace, batch_size: int):  # noqa: ANN201 - a PredictionService, imported late
    from fingpt_federated.infer.loading import open_model
    from fingpt_federated.infer.predictor import Predictor
    from fingpt_federated.infer.service import PredictionService
    from fingpt_federated.privacy.audit import AuditLog

    published, card = open_model(args.model_dir, args.variant)
    return PredictionService(
        Predictor(published, batch_size=batch_size),
        card,
        AuditLog(args.audit_log),
        cache_size=getattr(args, "cache_size", 0),
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from fingpt_federated.infer.inputs import read_inputs, record_inputs

    service = open_service(args, args.batch_size)
    table = read_inputs(args.input, service.predictor.published.manifest)
    inputs = [record_inputs(table.data, i) for i in range(len(table.data))]
    results = service.predict_data(
        table.data,
        inputs,
        explain=not args.no_explain,
        mc_samples=args.mc_samples,
        progress=len(table.data) > args.batch_size,
    )
    lines = [json.dumps({**ref, **result}, ensure_ascii=False) for ref, result in zip(table.refs, results, strict=True)]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"{len(results)} predictions -> {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if table.labelled:
        names = table.data.class_names
        correct = sum(names[label] == r["label"] for label, r in zip(table.data.labels, results, strict=True))
        print(f"accuracy {correct / len(results):.4f} on {len(results)} labelled records", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fingpt_federated.infer.guards import read_api_key
    from fingpt_federated.infer.limits import Limits
    from fingpt_federated.infer.web import create_app

    limits = Limits(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Limits)})
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    if api_key is None and args.host not in LOOPBACK:
        warning = f"serving on {args.host} without --api-key-file: anyone who reaches the port can predict"
        print(f"fingpt-infer: warning: {warning}", file=sys.stderr)
    service = open_service(args, args.batch_size)
    app = create_app(service, limits, api_key)
    # connections beyond the requests in progress get uvicorn's 503 (a slow client holds one, not a worker)
    connections = 4 * limits.max_in_progress + 16
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=connections)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="fingpt-infer", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish", help="merge, quantize and card a run's global model")
    pub.add_argument("run_dir", type=Path)
    pub.add_argument(
        "--state",
        type=Path,
        help="a plaintext state file instead of RUN_DIR/global_state.safetensors "
        "(e.g. one a bank decrypted with fingpt-client he-decrypt)",
    )
    pub.add_argument("--out", type=Path, help="model folder (default: publish.out of the run, else RUN_DIR/model)")
    pub.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: publish.variants of the run")
    pub.add_argument(
        "--select", choices=("best", "last"), help="which round (default: publish.select of the run, best)"
    )
    pub.set_defaults(run=cmd_publish)
    for name, run, help_text in (
        ("predict", cmd_predict, "predict every record of a file"),
        ("serve", cmd_serve, "serve /predict, /health and /model over HTTP"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("model_dir", type=Path)
        sub.add_argument("--variant", default="fp32", choices=VARIANTS)
        sub.add_argument("--audit-log", type=Path, default=Path(DEFAULT_AUDIT_LOG))
        sub.add_argument("--batch-size", type=int, default=32)
        sub.set_defaults(run=run)
    predict = commands.choices["predict"]
    predict.add_argument(
        "input", type=Path, help="CSV, Parquet or JSONL with the training data's columns (the label column is optional)"
    )
    predict.add_argument("--out", type=Path, help="JSON lines of predictions (default: stdout)")
    predict.add_argument("--no-explain", action="store_true", help="skip the token / series-step attributions")
    predict.add_argument("--mc-samples", type=int, default=0, help="Monte Carlo dropout passes for uncertainty")
    serve = commands.choices["serve"]
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--cache-size", type=int, default=1024, help="predictions kept for repeated inputs")
    add_limit_options(serve)
    return root


def add_limit_options(serve: argparse.ArgumentParser) -> None:
    """--api-key-file and one option per field of infer.limits.Limits (defaults there)."""
    from fingpt_federated.infer.limits import Limits

    serve.add_argument(
        "--api-key-file",
        type=Path,
        help="a file (chmod 600) holding the key every request but /health must send as 'Authorization: Bearer KEY'",
    )
    defaults = Limits()
    helps = {
        "max_body_bytes": "largest request body (413 above)",
        "max_records": "records in one request",
        "max_text_chars": "characters of one text",
        "max_series_steps": "steps of one series (the model's own maximum applies too)",
        "max_mc_samples": "Monte Carlo dropout passes one request may ask for",
        "max_in_progress": "requests running or waiting for the model; more get 503 with Retry-After",
        "time_limit_s": "seconds a request may take once its body is read (504 after), and its body to arrive (408)",
    }
    for name, text in helps.items():
        default = getattr(defaults, name)
        serve.add_argument(
            "--" + name.replace("_", "-"), type=type(default), default=default, help=f"{text} (default {default})"
        )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    try:
        return args.run(args)
    except (DataError, FileNotFoundError, ValueError) as error:
        return fail(str(error))


if __name__ == "__main__":
    sys.exit(main())
