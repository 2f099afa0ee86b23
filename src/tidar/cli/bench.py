"""`tidar bench`: decoding methods side by side on the same prompts, in one process."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tidar.cli.args import (
    Parser,
    add_generation_args,
    add_model_args,
    float_list,
    generation_overrides,
    int_list,
    positive_int,
    run_command,
    str_list,
)
from tidar.decode.options import options
from tidar.measure.bench import benchmark, check_options, format_table
from tidar.measure.cold_start import MAX_NEW_TOKENS, cold_start, format_cold_start
from tidar.measure.plots import plot_bench
from tidar.measure.prompts import SOURCES, BenchError, load_prompts
from tidar.measure.runners import (
    METHODS,
    SAMPLING_METHODS,
    SAMPLING_OPTIONS,
    BenchOptions,
    parse_methods,
    validate_methods,
)

# the engine options a benchmark varies: the operating point's, and beta
ENGINE_FLAGS = [f.name for f in options("tuned")] + ["beta"]


def add_method_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `tidar bench` and `tidar eval humaneval`."""
    add_model_args(p)
    g = p.add_argument_group("the tidar methods' decoding options")
    add_generation_args(g, ENGINE_FLAGS)
    p.add_argument("--draft-model", default=None, help="spec: draft model directory")
    p.add_argument("--draft-layers", type=positive_int, default=None,
                   help="spec: use the target's first N layers as the draft (when no --draft-model)")
    p.add_argument("--gamma", type=positive_int, default=4, help="spec: draft tokens per step (default 4)")
    p.add_argument("--thresholds", type=float_list, default=[0.9],
                   help="diffusion: confidence thresholds, one run each (default 0.9)")
    p.add_argument("--block-sizes", type=int_list, default=[],
                   help="tidar-diffusion: one run per block size, e.g. 2,3,4 (default: the engine's)")
    p.add_argument("--policies", type=str_list, default=[],
                   help="tidar-diffusion: one run per policy, e.g. all,full (default: all, the paper's)")
    p.add_argument("--betas", type=float_list, default=[],
                   help="tidar-diffusion: one run per beta, e.g. 0,0.5,1 (the paper's Figure 6; default: --beta)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up generations per method (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(model=args.model, dtype=args.dtype, threads=args.threads, compile=args.compile,
                        weights=args.weights,
                        engine=generation_overrides(args, ENGINE_FLAGS),
                        sampling=generation_overrides(args, SAMPLING_OPTIONS), draft_model=args.draft_model,
                        draft_layers=args.draft_layers, thresholds=tuple(args.thresholds), gamma=args.gamma,
                        warmup=args.warmup, block_sizes=tuple(args.block_sizes), policies=tuple(args.policies), betas=tuple(args.betas))


def build_parser() -> Parser:
    p = Parser(prog="tidar bench", description="Decoding methods side by side: tokens/s, tokens/forward, "
                                                "and whether greedy output equals AR's.")
    p.add_argument("--prompts", required=True, help="humaneval | prose | a .jsonl file of {\"prompt\", \"chat\"?}")
    p.add_argument("--methods", default="ar,tidar", help=f"comma-separated, from: {', '.join(METHODS)}")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="per prompt (default 128)")
    p.add_argument("--limit", type=positive_int, default=None, help="first K prompts (prose default: 20)")
    p.add_argument("--data", default=None, help="shard directory whose val split gives the prose prompts")
    add_method_args(p)
    s = p.add_argument_group(f"sampling (methods {', '.join(SAMPLING_METHODS)}; matches_ar does not apply: "
                             "each method draws its own random tokens)")
    add_generation_args(s, SAMPLING_OPTIONS)
    p.add_argument("--json", default=None, help="write the report to this file")
    p.add_argument("--plots", default=None, help="write PNG plots to this directory")
    p.add_argument("--profile", default=None, help="a `tidar profile --json` file to plot with the operating point")
    p.add_argument("--cold-start", type=positive_int, default=None, metavar="RUNS",
                   help="also time RUNS fresh `tidar generate --stream --max-new-tokens "
                        f"{MAX_NEW_TOKENS}` processes (with --model/--dtype/--weights/--threads as given) and as "
                        "many llama.cpp ones on the same GGUF, alternating, after one untimed run of each: "
                        "first token, wall time and peak RSS (the report's `cold_start`)")
    return p


def cold_start_report(args: argparse.Namespace) -> dict:
    """`--cold-start`: fresh `tidar generate` processes with the bench's model flags, and llama.cpp."""
    flags = {"--model": args.model, "--dtype": args.dtype, "--weights": args.weights, "--threads": args.threads}
    generate_args = []
    for flag, value in flags.items():
        if value is not None:
            generate_args += [flag, str(value)]
    report = cold_start(args.cold_start, generate_args=generate_args, threads=args.threads,
                        log=None if args.no_progress else sys.stderr)
    print(format_cold_start(report))
    return report


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods)
    opts = options_from_args(args)
    check_options(opts)
    validate_methods(methods, opts)
    if args.data is not None and args.prompts != "prose":
        raise BenchError("--data only applies to --prompts prose")
    if args.profile is not None and not Path(args.profile).is_file():
        raise BenchError(f"--profile {args.profile} does not exist (write one with `tidar profile --json FILE`)")
    prompts = load_prompts(args.prompts, args.limit, args.data)
    source = args.prompts if args.prompts in SOURCES else str(Path(args.prompts))
    report, rt = benchmark(opts, prompts, methods, args.max_new_tokens, source, progress=not args.no_progress)
    path = " | tidar.kernels" if rt.model.kernels_on else " | PyTorch engine path"
    print(f"{rt.name} | {args.dtype}, {rt.weights} weights{' compiled' if rt.compiled else ''}{path} | {report['threads']} threads | "
          f"{len(prompts)} prompts from {source} | max {args.max_new_tokens} new tokens")
    print(format_table(report["methods"]))
    sampling = report["config"]["sampling"]
    if sampling is not None:
        given = ", ".join(f"{k} {v}" for k, v in sampling.items() if v is not None)
        print(f"note: sampled ({given}): each method draws its own random tokens, so matches_ar does not apply")
    other_cpu = report["machine"]["other_cpu_share"]
    if other_cpu is not None and other_cpu > 0.1:
        print(f"note: other processes used {other_cpu:.0%} of the machine's CPU during the run: "
              "these timings are a smoke test only")
    if args.cold_start:
        report["cold_start"] = cold_start_report(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plots:
        profile = json.loads(Path(args.profile).read_text()) if args.profile else None
        for png in plot_bench(report, args.plots, profile=profile):
            print(f"wrote {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv, run, BenchError)
