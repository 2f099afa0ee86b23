"""`tidar lm-eval ARGS...`: lm-evaluation-harness's own command line with the "tidar" model
registered (`--model tidar --model_args model=DIR|smollm2,dtype=float32,...`; see
tidar.serve.lm_eval). Every argument goes to the harness unchanged: `tidar lm-eval --help` is its help."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tidar.serve import lm_eval as adapter


def main(argv: Sequence[str] | None = None) -> int:
    if adapter.LM is None:  # importing the adapter registered "tidar" only if lm-eval is there
        print("error: lm-eval is not installed (pip install lm-eval==0.4.13)", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    # the harness parses sys.argv itself
    sys.argv = ["tidar lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
