"""`tidar demo` (`make demo`): the README's demo, TiDAR vs AR side by side on the shipped model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tidar.cli.args import Parser, add_model_args, positive_int, run_command, setup_torch
from tidar.demo import run_demo


def build_parser() -> Parser:
    p = Parser(prog="tidar demo", description="TiDAR vs AR on a few prompts: streamed text, speed, exactness")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=96,
                   help="tokens generated per prompt and method (default: 96)")
    p.add_argument("--out", default="out/demo", help="directory for demo.json and demo.png (default: out/demo)")
    p.add_argument("--exact-check", action=argparse.BooleanOptionalAction, default=True,
                   help="re-run prompts whose outputs differed in a lower precision in float32, where rounding "
                        "ties cannot hide a real difference (default: on)")
    return p


def demo(args: argparse.Namespace) -> int:
    setup_torch(args.threads)
    run_demo(args.model, dtype=args.dtype, max_new_tokens=args.max_new_tokens, out_dir=args.out,
             compile=args.compile, weights=args.weights, exact_check=args.exact_check)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, demo)
