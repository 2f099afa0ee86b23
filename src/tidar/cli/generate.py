"""`tidar generate`: text from a prompt, TiDAR or AR, optionally streamed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tidar.cli.args import (
    CLIError,
    Parser,
    add_model_args,
    non_negative_int,
    parse_or_exit_code,
    positive_int,
    run_reporting_errors,
    setup_torch,
)
from tidar.runtime import Runtime


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["tidar", "ar"], default="tidar")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--block-size", type=positive_int, default=None, help="draft length b (default: model's)")
    p.add_argument("--policy", choices=["all", "full", "topk"], default=None,
                   help="which acceptance lengths get a pre-draft block (default: model's operating point)")
    p.add_argument("--policy-k", type=positive_int, default=None)
    p.add_argument("--beta", type=float, default=None, help="trust in AR logits at commit time (1.0 = lossless)")
    p.add_argument("--lookup-ngram", type=int, default=None,
                   help="merge prompt-lookup drafts matching the last N tokens (0 = off)")
    p.add_argument("--lookup-tokens", type=int, default=None,
                   help="longest prompt-lookup draft after the committed token; may exceed the block (0 = b-1)")
    p.add_argument("--lookup-occurrence", choices=["longest", "latest"], default=None,
                   help="copy after the earlier occurrence whose preceding tokens match furthest back "
                        "(longest), or the most recent one (default: the model's operating point)")
    p.add_argument("--datastore-tokens", type=non_negative_int, default=None,
                   help="longest draft from the model's datastore of its own outputs, where prompt lookup "
                        "finds nothing (0 = off; default: the model's operating point)")
    p.add_argument("--datastore-confidence", type=float, default=None,
                   help="cut a datastore draft where its estimated chance of being written falls below this "
                        "(0 = full length; default: the model's operating point)")
    p.add_argument("--min-draft-gain", type=float, default=None,
                   help="pre-draft only while diffusion drafts commit this many extra tokens per step "
                        "(0 = always; default: the model's operating point, 0.5 for the shipped model)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")



def build_parser() -> Parser:
    g = Parser(prog="tidar generate", description="generate text (TiDAR or AR)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"}')
    g.add_argument("--stream", action="store_true", help="print text as it is committed")
    add_model_args(g)
    add_decoding_args(g)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the text to continue")
    setup_torch(args.threads)
    rt = Runtime.load(args.model, dtype=args.dtype, compile=args.compile)
    gen = rt.generation_config(args)
    stream = sys.stdout if (args.stream and not args.json) else None
    result = rt.generate_text(args.prompt, gen, chat=args.chat, stop=args.stop, stream=stream)
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "stats": result.stats}))
    elif stream is None:
        print(result.text)
    else:
        print()
    return 0



def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_reporting_errors(lambda: cmd_generate(args))
