"""What every `tidar` subcommand shares: the one-line-error parser, argument types, error reporting.

Light on purpose (torch and the engine load inside the functions that need them), so `tidar --help`
and argument errors are instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


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


def int_list(text: str) -> list[int]:
    """'4,3,2' -> [4, 3, 2]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """'0.9,0.7' -> [0.9, 0.7]."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """'all,full' -> ['all', 'full']."""
    return [x.strip() for x in text.split(",") if x.strip()]


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def dtype_arg(text: str) -> str:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype must be float32 or bfloat16, got {text!r}")
    return DTYPES[text]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory, or 'smollm2' for the base model (default: the shipped TiDAR model)")
    p.add_argument("--dtype", type=dtype_arg, default="bfloat16", help="float32 | bfloat16 (default)")
    p.add_argument("--weights", default=None, metavar="{q4,dense}",
                   help="the base projections on the GGUF's own 4-bit Q4_1 blocks (q4: the model as published, "
                        "fastest) or on dense copies in --dtype (default: q4 where the model's base is a GGUF "
                        "and the kernel builds, else dense)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decoder blocks (default: the model's operating point)")


def setup_torch(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def run_reporting_errors(body: Callable[[], int], *user_errors: type[BaseException]) -> int:
    """Run a command body: a user error (bad input, missing weights, ...) prints one line and gives
    exit code 2 instead of a traceback; Ctrl-C gives 130."""
    from tidar.decode import GenerationError
    from tidar.model.weights import WeightsError

    try:
        return int(body() or 0)
    except (CLIError, GenerationError, WeightsError, argparse.ArgumentTypeError, *user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_command(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                body: Callable[[argparse.Namespace], int], *user_errors: type[BaseException]) -> int:
    """A subcommand's `main`: parse `argv` (a bad flag: argparse's one line, code 2), then run
    `body(args)` reporting user errors as one line (`run_reporting_errors`)."""
    args = parse_or_exit_code(parser, argv)
    if isinstance(args, int):
        return args
    return run_reporting_errors(lambda: body(args), *user_errors)


def parse_or_exit_code(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """Parsed args, or argparse's exit code (its one-line error is already printed)."""
    try:
        return parser.parse_args(None if argv is None else list(argv))
    except SystemExit as e:
        return int(e.code or 0)


def add_generation_args(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per decoding option (`tidar.decode.options`: its help text, type, choices and
    validation), or per option in `names`. Every flag defaults to None: the model's operating point
    (or the option's default) decides unless the flag is given."""
    from tidar.decode.options import option_type, options

    for f in options("flag"):
        if names is not None and f.name not in names:
            continue
        m, kind = f.metadata, option_type(f.name)
        default = "the model's operating point" if m["tuned"] else f.default
        help_ = m["help"] if "default:" in m["help"] or f.default is None else f"{m['help']} (default: {default})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_)
            continue
        metavar = "{" + ",".join(m["choices"]) + "}" if m["choices"] else {int: "N", float: "X"}.get(kind, "VALUE")
        p.add_argument(flag, type=_option_value(f.name), default=None, help=help_, metavar=metavar)


def _option_value(name: str) -> Callable[[str], object]:
    """An argparse type: the text as the option's type, validated as GenerationConfig does."""
    from tidar.decode.options import GenerationError, check_option, option_type

    def parse(text: str) -> object:
        want = option_type(name)
        try:
            value = want(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want.__name__}, got {text!r}") from None
        try:
            check_option(name, value)
        except GenerationError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{name} ")) from None
        return value

    return parse


def generation_overrides(args: argparse.Namespace, names: Sequence[str] | None = None) -> dict[str, object]:
    """The decoding options given on the command line by `add_generation_args` (with the same
    `names`), by option name."""
    from tidar.decode.options import options

    return {f.name: getattr(args, f.name) for f in options("flag")
            if (names is None or f.name in names) and getattr(args, f.name, None) is not None}
