"""`tidar profile`: forward latency vs number of new tokens on this machine."""

from __future__ import annotations

from collections.abc import Sequence

from tidar.cli.args import Parser, add_model_args, non_negative_int, parse_or_exit_code, positive_int, run_reporting_errors
from tidar.measure.profile import main as profile_main


def build_parser() -> Parser:
    pr = Parser(prog="tidar profile", description="forward latency vs number of new tokens on this machine")
    add_model_args(pr)
    pr.add_argument("--tokens", default="1,2,4,8,12,16,20,24,32,48,64,96,128,192,256,300")
    pr.add_argument("--prefix", type=positive_int, default=256, help="cached prefix length")
    pr.add_argument("--repeats", type=positive_int, default=5)
    pr.add_argument("--json", default=None, help="write the profile to this JSON file")
    pr.add_argument("--choose", action="store_true",
                    help="also measure draft acceptance and pick the block size / policy maximizing tokens/s")
    pr.add_argument("--choose-block-sizes", type=lambda t: [positive_int(x) for x in t.split(",")], default=[2, 3, 4])
    pr.add_argument("--lookup-ngram", type=int, default=0)
    pr.add_argument("--choose-lookup-tokens", type=lambda t: [non_negative_int(x) for x in t.split(",")], default=[0],
                    help="with --lookup-ngram: candidate prompt-lookup draft lengths (0 = within the block)")
    return pr


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_or_exit_code(build_parser(), argv)
    if isinstance(args, int):
        return args
    return run_reporting_errors(lambda: profile_main(args))
