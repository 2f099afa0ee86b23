"""`tidar data build|generate|info`: tokenized training shards from text sources, shards of the
model's own greedy continuations, and a summary of a shard directory."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tidar.cli.args import (
    CLIError,
    Parser,
    dtype_arg,
    non_negative_int,
    positive_int,
    run_command,
    setup_torch,
)
from tidar.train.errors import DataError


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _prompt_tokens(text: str) -> int:
    value = positive_int(text)
    if value < 8:
        raise argparse.ArgumentTypeError(f"must be >= 8, got {value}")
    return value


def _add_build(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build", help="tokenize sources into train/val shards")
    b.add_argument("--sources", required=True,
                   help="comma-separated: stdlib, python-doc, bible, a directory, a .jsonl file ({\"text\": ...} "
                        "per line) or a text file")
    b.add_argument("--out", required=True, help="output directory (train.bin, val.bin, index.json)")
    b.add_argument("--val-fraction", type=_fraction, default=0.02,
                   help="share of each source's files held out for validation, at least one per source of "
                        ">= 2 files (default: 0.02)")
    b.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the val split and of the train order (default: 0)")
    b.add_argument("--max-tokens", type=positive_int, default=None,
                   help="cap on train tokens (the train order is shuffled, so a cap keeps a mix of sources)")
    b.add_argument("--eos-id", type=non_negative_int, default=None,
                   help="token id written after each document (default: the tokenizer's eos)")
    b.add_argument("--tokenizer", default="default",
                   help="'default' (the shipped model's), a tokenizer directory or name, or a .gguf file")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="shards of the model's own greedy continuations of corpus prompts")
    g.add_argument("--shards", required=True, help="shard directory whose train split gives the prompts")
    g.add_argument("--out", required=True, help="output directory (resumes its generated.jsonl)")
    g.add_argument("--prompts", default="corpus", choices=["corpus", "code"],
                   help="corpus: windows of --shards' train split; code: functions with docstrings (ending after "
                        "the docstring, a quarter as chat turns) from the stdlib files of --shards' train split")
    g.add_argument("--code-source", default="stdlib",
                   help="with --prompts code: comma-separated sources of the Python files (stdlib, or directories, "
                        "e.g. installed packages); stdlib files in --shards' val split are always left out")
    g.add_argument("--samples", type=positive_int, required=True, help="samples to generate in all (a re-run resumes)")
    g.add_argument("--skip-prompts", type=non_negative_int, default=0,
                   help="with --prompts code: start after this many prompts of the seeded order (the ones an earlier "
                        "run with the same seed continued), so a new run sees new prompts")
    g.add_argument("--prompt-tokens", type=_prompt_tokens, default=64,
                   help="with --prompts corpus: longest prompt window, in tokens (>= 8; default: 64)")
    g.add_argument("--new-tokens", type=positive_int, default=192,
                   help="greedy tokens generated per sample, fewer where the model ends (default: 192)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="prompts generated together (default: 32)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the prompt choice and order (default: 0)")
    g.add_argument("--model", default=None, help="model name or directory (default: the shipped model)")
    g.add_argument("--dtype", type=dtype_arg, default="bfloat16", help="float32 | bfloat16 (default)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    g.add_argument("--time-limit-min", type=float, default=None,
                   help="stop (resumably: re-run the same command) after this many minutes")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> Parser:
    p = Parser(prog="tidar data", description="Build and inspect token shards.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="{build,generate,info}")
    _add_build(sub)
    _add_generate(sub)
    i = sub.add_parser("info", help="summarise a shard directory")
    i.add_argument("dir", help="shard directory (as written by build or generate)")
    return p


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def cmd_build(args: argparse.Namespace) -> int:
    from tidar.train.corpora import open_source
    from tidar.train.shards import build_shards, tokenizer_from_spec

    sources = _split(args.sources)
    for s in sources:  # cheap validation before the (slow) tokenizer load
        open_source(s)
    idx = build_shards(sources, tokenizer_from_spec(args.tokenizer), args.out, val_fraction=args.val_fraction,
                       seed=args.seed, max_tokens=args.max_tokens, eos_id=args.eos_id, progress=not args.no_progress)
    skipped = ", ".join(f"{v} {k}" for k, v in idx["skipped"].items() if v) or "none"
    print(f"wrote {args.out}: train {idx['train']['tokens']:,} tokens / {len(idx['train']['files'])} files, "
          f"val {idx['val']['tokens']:,} tokens / {len(idx['val']['files'])} files ({idx['dtype']}); "
          f"skipped: {skipped}")
    return 0


def _code_sources(args: argparse.Namespace) -> list[str] | None:
    """The sources of code prompts, or None for corpus prompts; flags that do not go together are refused."""
    code_sources = _split(args.code_source)
    if args.prompts != "code":
        if args.skip_prompts:
            raise CLIError("--skip-prompts applies to --prompts code only")
        if code_sources != ["stdlib"]:
            raise CLIError("--code-source applies to --prompts code only")
        return None
    if not code_sources:
        raise CLIError("--code-source is empty; name stdlib or a directory of Python files")
    return code_sources


def cmd_generate(args: argparse.Namespace) -> int:
    from tidar.train.selfgen import generate_from_model

    code_sources = _code_sources(args)
    setup_torch(args.threads)
    idx = generate_from_model(
        args.shards, args.out, samples=args.samples, code_sources=code_sources, skip_prompts=args.skip_prompts,
        model=args.model, dtype=args.dtype, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        batch_size=args.batch_size, seed=args.seed, time_limit_min=args.time_limit_min, progress=not args.no_progress)
    if idx is None:
        print(f"time limit reached; re-run the same command to continue {args.out}")
    else:
        print(f"wrote {args.out}: train {idx['train']['tokens']:,} tokens, val {idx['val']['tokens']:,} "
              f"tokens ({idx['generated']['completion_tokens']:,} generated)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from tidar.train.loader import SPLITS, TokenShards

    sh = TokenShards(args.dir)
    ix = sh.index
    print(f"{sh.path}: dtype={ix['dtype']} vocab={ix['vocab_size']} eos={ix['eos_id']} "
          f"tokenizer={ix.get('tokenizer')} sources={','.join(ix.get('sources', []))}")
    for s in SPLITS:
        print(f"  {s}: {ix[s]['tokens']:,} tokens, {len(ix[s]['files'])} files")
    return 0


COMMANDS = {"build": cmd_build, "generate": cmd_generate, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    """`tidar data build|generate|info ...`; returns 0, or 2 with one `error: ...` line on bad input."""
    return run_command(build_parser(), argv, lambda args: COMMANDS[args.cmd](args), DataError)
