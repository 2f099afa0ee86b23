"""`tidar export`: a training run's adapter (or an adapter directory) as the shipped default model,
with its operating point and a description of its training data in the manifest."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from tidar.cli.args import Parser, run_command
from tidar.train.errors import DataError, ExportError


def build_parser() -> Parser:
    p = Parser(prog="tidar export", description="Export a trained adapter as the shipped default model.")
    p.add_argument("src", help="a training run directory (its latest checkpoint) or an adapter directory")
    p.add_argument("--out", default=None,
                   help="destination directory (default: the shipped model, tidar/assets/smollm2-tidar)")
    p.add_argument("--operating-point", default=None,
                   help="the model's default decoding settings: a JSON file or inline JSON object, or the output of "
                        "`tidar profile --choose --json` (its best choice is taken)")
    p.add_argument("--data", default=None,
                   help="shard directory whose index.json describes the training data (recorded in the manifest)")
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from tidar.model.weights import ADAPTER_FILE, SHIPPED_MODEL
    from tidar.train.export import data_record, export, operating_point_from

    out = Path(args.out) if args.out is not None else SHIPPED_MODEL
    op = operating_point_from(args.operating_point) if args.operating_point else None
    extra = {"data": data_record(args.data)} if args.data else {}
    manifest = export(Path(args.src), out, op, extra=extra)
    size = (out / ADAPTER_FILE).stat().st_size
    total = f", {manifest['tokens_total']} in all" if "tokens_total" in manifest else ""
    print(f"exported step {manifest.get('step')} ({manifest.get('tokens')} tokens{total}) to {out} "
          f"({size / 2**20:.1f} MiB, sha256 {manifest['sha256'][:12]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar export SRC ...`; returns 0, or 2 with one `error: ...` line on bad input."""
    return run_command(build_parser(), argv, cmd_export, ExportError, DataError, FileNotFoundError)
