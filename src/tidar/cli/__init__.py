"""`tidar` command line: one entry point, one module per subcommand (`tidar/cli/<command>.py`).

This package is the only place that parses arguments; each subcommand module is imported only when
it runs, so `tidar --help` is instant and a missing optional dependency affects only its command."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from tidar.cli.args import Parser

# OMP_WAIT_POLICY is left to the user: on an idle machine the default (spinning) threads decode
# ~1.4x faster than PASSIVE here, but under CPU contention spinning collapses (set PASSIVE then).

COMMANDS = {  # name -> (module under tidar.cli, help)
    "generate": ("generate", "generate text (TiDAR or AR)"),
    "bench": ("bench", "side-by-side speed and quality benchmark"),
    "eval": ("eval", "HumanEval pass@1 and perplexity"),
    "profile": ("profile", "forward latency vs number of new tokens on this machine"),
    "serve": ("serve", "OpenAI-compatible HTTP server"),
    "lm-eval": ("lm_eval", "run lm-evaluation-harness with the tidar model"),
    "train": ("train", "train a TiDAR model (see configs/)"),
    "data": ("data", "build tokenized training shards, or generate the model's own outputs"),
    "datastore": ("datastore", "index the model's own outputs as a source of drafts"),
    "export": ("export", "export a trained adapter as the shipped default model, or (--hf) for transformers"),
    "plot": ("plot", "plot training metrics"),
    "reproduce": ("reproduce", "the paper's AR / TiDAR / block diffusion comparison at laptop scale"),
    "demo": ("demo", "the README's demo: the shipped model, TiDAR vs AR"),
}


def build_parser() -> Parser:
    parser = Parser(prog="tidar", description="TiDAR: lossless multi-token decoding on CPUs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help or a one-line error and exits
        return 2
    module, _ = COMMANDS[argv[0]]
    try:
        mod = importlib.import_module(f"tidar.cli.{module}")
    except ModuleNotFoundError as e:
        print(f"error: `tidar {argv[0]}` is unavailable: {e}", file=sys.stderr)
        return 2
    return int(mod.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
