"""`tidar serve`: the OpenAI-compatible HTTP server (one generation at a time)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import uvicorn

from tidar.cli.args import (
    CLIError,
    Parser,
    add_model_args,
    positive_int,
    run_command,
    setup_torch,
)
from tidar.runtime import Runtime
from tidar.serve.server import create_app

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


def build_parser() -> Parser:
    p = Parser(prog="tidar serve", description="OpenAI-compatible HTTP server (one generation at a time)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models and in responses (default: the model directory's name)")
    p.add_argument("--learn", action="store_true",
                   help="the model's datastore learns every output served, so later requests can draft from "
                        "earlier answers (kept in memory only)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="least severe message logged, by the server and by uvicorn (default: info)")
    return p


def load_runtime(args: argparse.Namespace) -> Runtime:
    setup_torch(args.threads)
    runtime = Runtime.load(args.model, dtype=args.dtype, compile=args.compile)
    if args.learn:
        if runtime.datastore is None:
            raise CLIError(f"--learn needs a model with a datastore; {runtime.name} has none "
                           "(build one with `tidar datastore build`)")
        runtime.learn = True
    return runtime


def serve(args: argparse.Namespace) -> int:
    runtime = load_runtime(args)
    logging.basicConfig(level=args.log_level.upper())
    app = create_app(runtime, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, serve)
