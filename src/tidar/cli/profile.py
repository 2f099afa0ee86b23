"""`tidar profile`: forward latency vs number of new tokens on this machine."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from tidar.cli.args import (
    Parser,
    add_model_args,
    int_list,
    non_negative_int,
    positive_int,
    run_command,
    setup_torch,
)
from tidar.measure.profile import DEFAULT_TOKENS, run_profile


def _list_of(item: Callable[[str], int]) -> Callable[[str], list[int]]:
    """A comma-separated list whose every item passes `item` (positive_int, ...)."""
    def parse(text: str) -> list[int]:
        values = [item(str(x)) for x in int_list(text)]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values
    return parse


def build_parser() -> Parser:
    pr = Parser(prog="tidar profile", description="forward latency vs number of new tokens on this machine")
    add_model_args(pr)
    pr.add_argument("--tokens", type=_list_of(positive_int), default=list(DEFAULT_TOKENS),
                    help="numbers of new tokens T per forward to time, comma-separated "
                         f"(default: {','.join(map(str, DEFAULT_TOKENS))})")
    pr.add_argument("--prefix", type=positive_int, default=256,
                    help="tokens already in the KV cache when each timed forward runs (default: 256)")
    pr.add_argument("--repeats", type=positive_int, default=5,
                    help="timed rounds per T after one warm-up round; the median is reported (default: 5)")
    pr.add_argument("--json", default=None, help="write the profile to this JSON file")
    pr.add_argument("--choose", action="store_true",
                    help="also measure draft acceptance and pick the block size / policy maximizing tokens/s")
    pr.add_argument("--choose-block-sizes", type=_list_of(positive_int), default=[2, 3, 4],
                    help="with --choose: candidate block sizes, comma-separated (default: 2,3,4)")
    pr.add_argument("--lookup-ngram", type=non_negative_int, default=0,
                    help="with --choose: calibrate with prompt-lookup drafts matching the last N tokens "
                         "(default: 0 = off)")
    pr.add_argument("--choose-lookup-tokens", type=_list_of(non_negative_int), default=[0],
                    help="with --lookup-ngram: candidate prompt-lookup draft lengths, comma-separated "
                         "(0 = within the block; default: 0)")
    return pr


def profile(args: argparse.Namespace) -> int:
    setup_torch(args.threads)
    run_profile(args.model, dtype=args.dtype, compile=args.compile, weights=args.weights, tokens=args.tokens, prefix=args.prefix,
                repeats=args.repeats, choose=args.choose, block_sizes=args.choose_block_sizes,
                lookup_ngram=args.lookup_ngram, lookup_tokens=args.choose_lookup_tokens, json_path=args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, profile)
