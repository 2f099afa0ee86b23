"""`tidar generate`: text from a prompt, TiDAR or AR, optionally streamed, optionally compared with AR
and with TiDAR's diffusion drafts alone (`--compare`)."""

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
from tidar.runtime import Runtime, TextResult


def build_parser() -> Parser:
    g = Parser(prog="tidar generate", description="generate text (TiDAR or AR)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"}')
    g.add_argument("--stream", action="store_true", help="print text as it is committed")
    g.add_argument("--diffusion-only", action="store_true",
                   help="TiDAR as in the paper: diffusion drafts only (no prompt lookup, no datastore, no gate, "
                        "policy all); explicit flags still win")
    g.add_argument("--compare", action="store_true",
                   help="also decode the same prompt with AR and with diffusion drafts only, and report their "
                        "stats next to this run's (with --json: a \"compare\" key; otherwise a summary on stderr)")
    g.add_argument("--stop", action="append", default=[],
                   help="end the text before this string (repeatable); the stop string is not printed")
    add_model_args(g)
    add_generation_args(g)
    return g


def cmd_generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the text to continue")
    if args.compare and (args.mode == "ar" or args.diffusion_only):
        what = "--mode ar" if args.mode == "ar" else "--diffusion-only"
        raise CLIError(f"--compare already decodes with AR and with diffusion drafts only; drop {what} "
                       "(the run compared is TiDAR's operating point, with any other flags given)")
    setup_torch(args.threads)
    # no transformers import on this path: its tokenizer cost 3.7-4.4 s of a cold start
    rt = Runtime.load(args.model, dtype=args.dtype, compile=args.compile, weights=args.weights, light_tokenizer=True)
    overrides = generation_overrides(args)
    preset = DIFFUSION_ONLY if args.diffusion_only else {}
    gen = rt.generation_config(**{**preset, **overrides})
    stream = sys.stdout if (args.stream and not args.json) else None
    result = rt.generate_text(args.prompt, gen, chat=args.chat, stop=args.stop, stream=stream)
    compare = _compare(rt, args, overrides, result) if args.compare else None
    if args.json:
        out = {"text": result.text, "tokens": result.tokens, "stats": result.stats}
        print(json.dumps(out if compare is None else {**out, "compare": compare}))
        return 0
    print(result.text if stream is None else "")
    if compare is not None:
        print(_summary(result.stats, compare), file=sys.stderr)
    return 0


def _compare(rt: Runtime, args: argparse.Namespace, overrides: dict, result: TextResult) -> dict:
    """The same prompt decoded with AR and with diffusion drafts only (the other flags given still
    apply; the preset wins over copy-draft flags), against `result`."""
    def run(**preset: object) -> TextResult:
        gen = rt.generation_config(**{**overrides, **preset})
        return rt.generate_text(args.prompt, gen, chat=args.chat, stop=args.stop)

    ar, diffusion = run(mode="ar"), run(**DIFFUSION_ONLY)
    return {"ar": ar.stats, "diffusion_only": diffusion.stats, "matches_ar": result.tokens == ar.tokens,
            "diffusion_only_matches_ar": diffusion.tokens == ar.tokens}


def _summary(stats: dict, compare: dict) -> str:
    """`--compare` without --json: each run's tokens/forward and tokens/s, and its speedup over AR."""
    ar = compare["ar"]

    def line(label: str, s: dict, same: bool | None = None) -> str:
        speed = f" ({s['tokens_per_s'] / ar['tokens_per_s']:.2f}x AR)" if same is not None and ar["tokens_per_s"] else ""
        exact = "" if same is None else f", identical to AR: {same}"
        return f"  {label:<22} {s['tokens_per_forward']:.2f} tokens/forward, {s['tokens_per_s']:.1f} tok/s{speed}{exact}"

    return "\n".join(["compare (same prompt and flags):", line("this run:", stats, compare["matches_ar"]),
                      line("diffusion drafts only:", compare["diffusion_only"], compare["diffusion_only_matches_ar"]),
                      line("AR:", ar)])


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, cmd_generate)
