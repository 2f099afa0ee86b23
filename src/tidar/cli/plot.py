"""`tidar plot RUN_DIR... [--out file.png]`: training metrics of one or more runs in one figure."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tidar.cli.args import Parser, run_command
from tidar.measure.plots import MetricsError, plot_metrics


def build_parser() -> Parser:
    p = Parser(prog="tidar plot", description="plot training metrics of one or more runs in one figure")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories made by `tidar train` (or their metrics.jsonl files)")
    p.add_argument("--out", default=None, help="PNG path (default: metrics.png in the first run's directory)")
    return p


def plot(args: argparse.Namespace) -> int:
    print(f"wrote {plot_metrics(args.runs, args.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, plot, FileNotFoundError, MetricsError)
