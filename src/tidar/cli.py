"""`tidar` command line: one entry point with subcommands (generate, profile, bench, eval, train,
data, plot, serve, export, datastore). Heavy imports happen inside the subcommands so `tidar --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

# OMP_WAIT_POLICY is left to the user: on an idle machine the default (spinning) threads decode
# ~1.4x faster than PASSIVE here, but under CPU contention spinning collapses (set PASSIVE then).


class CLIError(Exception):
    """An error to show as one line, without a traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line instead of usage + error
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_arg(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be float32 or bfloat16, got {text!r}")
    return DTYPES[text]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory, or 'smollm2' for the base model (default: the shipped TiDAR model)")
    p.add_argument("--dtype", type=dtype_arg, default="bfloat16", help="float32 | bfloat16 (default)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder blocks (default: the model's operating point)")


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


def run_reporting_errors(body: Callable[[], int], *user_errors: type[BaseException]) -> int:
    """Run a command body: a user error (bad input, missing weights, ...) prints one line and gives
    exit code 2 instead of a traceback; Ctrl-C gives 130."""
    from tidar.decoding import GenerationError
    from tidar.weights import WeightsError

    try:
        return int(body() or 0)
    except (CLIError, GenerationError, WeightsError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def cmd_generate(args: argparse.Namespace) -> int:
    from tidar.runtime import Runtime

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


def cmd_profile(args: argparse.Namespace) -> int:
    from tidar.profile import main as profile_main

    return profile_main(args)


def build_parser() -> Parser:
    parser = Parser(prog="tidar", description="TiDAR: lossless multi-token decoding on CPUs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate text (TiDAR or AR)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help='print {"text", "tokens", "stats"}')
    g.add_argument("--stream", action="store_true", help="print text as it is committed")
    add_model_args(g)
    add_decoding_args(g)
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("profile", help="forward latency vs number of new tokens on this machine")
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
    pr.set_defaults(func=cmd_profile)

    for name, module, help_ in (
        ("train", "tidar.train", "train a TiDAR model (see configs/)"),
        ("data", "tidar.data", "build tokenized training shards"),
        ("plot", "tidar.plots", "plot training metrics"),
        ("bench", "tidar.bench", "side-by-side speed and quality benchmark"),
        ("eval", "tidar.evaluate", "HumanEval pass@1 and perplexity"),
        ("serve", "tidar.server", "OpenAI-compatible HTTP server"),
        ("lm-eval", "tidar.lm_eval_adapter", "run lm-evaluation-harness with the tidar model"),
        ("export", "tidar.ship", "export a trained adapter as the shipped default model"),
        ("datastore", "tidar.datastore", "index the model's own outputs as a source of drafts"),
    ):
        s = sub.add_parser(name, help=help_, add_help=False)
        s.set_defaults(delegate=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("train", "data", "plot", "bench", "eval", "serve", "lm-eval", "export", "datastore"):
        import importlib

        module = parser.parse_args(argv[:1]).delegate
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            print(f"error: `tidar {argv[0]}` is unavailable: {e}", file=sys.stderr)
            return 2
        return int(mod.main(argv[1:]) or 0)
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
