"""`tidar datastore build|info`: index the model's own outputs as a source of drafts."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tidar.cli.args import Parser, int_list, run_command
from tidar.decode import Datastore, DatastoreError
from tidar.decode.drafters.datastore import ORDERS
from tidar.model.weights import resolve_model_path
from tidar.train.errors import DataError
from tidar.train.selfgen import build_datastore


def build_parser() -> Parser:
    p = Parser(prog="tidar datastore", description="a datastore of the model's own outputs, for drafts")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    b = sub.add_parser("build", help="index `tidar data generate` outputs into a model directory")
    b.add_argument("--generated", required=True,
                   help="comma-separated directories written by `tidar data generate` (their generated.jsonl)")
    b.add_argument("--out", required=True, help="model directory to write datastore.safetensors into")
    b.add_argument("--orders", type=int_list, default=list(ORDERS),
                   help="n-gram orders to index, longest tried first when drafting (default: 4,3,2)")
    b.add_argument("--datastore-tokens", type=int, default=None,
                   help="also make this the model's default datastore_tokens (its manifest's operating point)")
    i = sub.add_parser("info", help="what a model directory's datastore holds")
    i.add_argument("model", nargs="?", default=None, help="model directory (default: the shipped model)")
    return p


def info(model: str | None) -> int:
    t = time.perf_counter()
    ds = Datastore.load(resolve_model_path(model))
    print(json.dumps({"tokens": len(ds), "sequences": ds.sequences, "orders": list(ds.orders),
                      "vocab_size": ds.vocab_size, "load_s": round(time.perf_counter() - t, 2), **ds.meta}, indent=1))
    return 0


def build(args) -> int:  # noqa: ANN001
    if args.datastore_tokens is not None and args.datastore_tokens < 0:
        raise DatastoreError(f"--datastore-tokens must be >= 0, got {args.datastore_tokens}")
    op = {} if args.datastore_tokens is None else {"datastore_tokens": args.datastore_tokens}
    path, ds = build_datastore([d for d in args.generated.split(",") if d], Path(args.out), args.orders, op)
    print(f"{path}: {len(ds):,} tokens of {ds.sequences:,} sequences, orders {list(ds.orders)}, "
          f"{path.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, lambda args: info(args.model) if args.action == "info" else build(args),
                       DatastoreError, DataError)
