"""`tidar generate`: text from a prompt, TiDAR or AR, optionally streamed."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tidar.cli.args import (
    CLIError,
    Parser,
    add_generation_args,
    add_model_args,
    generation_overrides,
    run_command,
    setup_torch,
)
from tidar.decode.options import DIFFUSION_ONLY
from tidar.runtime import Runtime


def build_parser() -> Parser:
    g = Parser(prog="tidar generate", description="generate text (TiDAR or AR)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"}')
    g.add_argument("--stream", action="store_true", help="print text as it is committed")
    g.add_argument("--diffusion-only", action="store_true",
                   help="TiDAR as in the paper: diffusion drafts only (no prompt lookup, no datastore, no gate, "
                        "policy all); explicit flags still win")
    g.add_argument("--stop", action="append", default=[],
                   help="end the text before this string (repeatable); the stop string is not printed")
    add_model_args(g)
    add_generation_args(g)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the text to continue")
    setup_torch(args.threads)
    rt = Runtime.load(args.model, dtype=args.dtype, compile=args.compile)
    preset = DIFFUSION_ONLY if args.diffusion_only else {}
    gen = rt.generation_config(**{**preset, **generation_overrides(args)})
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
    return run_command(build_parser(), argv, cmd_generate)
