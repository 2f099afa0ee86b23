"""`tidar serve`: the OpenAI-compatible HTTP server (one generation at a time, behind a bounded queue)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import uvicorn

from tidar.cli.args import (
    CLIError,
    Parser,
    add_model_args,
    positive_int,
    run_command,
    setup_torch,
    str_list,
)
from tidar.runtime import Runtime
from tidar.serve.config import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT, ServerConfig
from tidar.serve.server import ServerConfigError, create_app

LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
API_KEY_ENV = "TIDAR_API_KEY"


def port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def build_parser() -> Parser:
    p = Parser(prog="tidar serve", description="OpenAI-compatible HTTP server (one generation at a time)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=port, default=8000, help="TCP port to listen on (default: 8000)")
    p.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models and in responses (default: the model directory's name)")
    _add_limit_args(p)
    _add_security_args(p)
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                   help="least severe message logged, by the server and by uvicorn (default: info)")
    return p


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-queue", type=positive_int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests allowed to wait for the model; past it: 429 with Retry-After (default: {DEFAULT_MAX_QUEUE})")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH,
                   help="sequences decoded together: requests join the running batch between steps while it has room "
                        f"(TiDAR drafts while it holds at most the model's max_draft_batch, AR past it; default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-tokens-limit", type=positive_int, default=None,
                   help="largest max_tokens a request may ask for; above it: 400 (default: the model's context decides)")
    p.add_argument("--request-timeout", type=seconds, default=DEFAULT_REQUEST_TIMEOUT,
                   help="seconds from arrival (queueing included) after which a request is stopped: 504, or an error "
                        f"event in a stream (default: {DEFAULT_REQUEST_TIMEOUT:g}; 0: no limit)")
    p.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body; above it: 413 (default: {DEFAULT_MAX_BODY_BYTES}, 1 MiB)")


def _add_security_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help=f"require `Authorization: Bearer KEY` on every /v1 route (401 otherwise); repeat for several "
                        f"keys (default: the comma-separated keys in ${API_KEY_ENV}, which unlike a flag no other "
                        "user of the machine can read; /health and /metrics stay open)")
    p.add_argument("--allowed-origins", type=str_list, default=[], metavar="ORIGINS",
                   help="comma-separated origins allowed by CORS, e.g. https://app.example.com, or * (default: none, "
                        "no CORS headers: browsers on other sites cannot call the server)")
    p.add_argument("--learn", action="store_true",
                   help="the model's datastore learns every output served, so later requests can draft from earlier "
                        "answers (in memory only); needs an API key: each key learns from and drafts with its own answers")


def server_config(args: argparse.Namespace) -> ServerConfig:
    keys = args.api_key if args.api_key is not None else str_list(os.environ.get(API_KEY_ENV, ""))
    config = ServerConfig(max_queue=args.max_queue, max_batch=args.max_batch, max_tokens_limit=args.max_tokens_limit,
                          request_timeout=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
                          api_keys=list(keys), allowed_origins=args.allowed_origins, learn=args.learn)
    try:
        config.check()
    except ServerConfigError as e:
        raise CLIError(str(e)) from None
    return config


def load_runtime(args: argparse.Namespace) -> Runtime:
    setup_torch(args.threads)
    runtime = Runtime.load(args.model, dtype=args.dtype, compile=args.compile, weights=args.weights)
    if args.learn and runtime.datastore is None:
        raise CLIError(f"--learn needs a model with a datastore; {runtime.name} has none "
                       "(build one with `tidar datastore build`)")
    return runtime


def serve(args: argparse.Namespace) -> int:
    config = server_config(args)  # before loading weights: a bad setting fails at once
    runtime = load_runtime(args)
    logging.basicConfig(level=args.log_level.upper())
    app = create_app(runtime, args.served_model_name, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, serve, ServerConfigError)
