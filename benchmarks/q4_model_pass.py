"""All of the shipped model's Q4_1 projections called in sequence, as a decode step reads them: each
weight is used once per pass, so the codes stream from memory instead of staying in cache as they do
in `q4_rows.py`'s loop over one weight. Also with the LM head after them. Milliseconds per pass (median
of 5 rounds of 20 passes). Comparing two builds of the kernel means two processes, one after the other:
run it before and after, and again, since the machine's speed drifts.

    .venv/bin/python benchmarks/q4_model_pass.py --rows 1,7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,7")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = Runtime.load(None, dtype="bfloat16").model
    weights = [f.q4 for _, f, _ in model.fused_projections()]
    if any(w is None for w in weights):
        raise SystemExit("the shipped model did not load on the q4 path")
    for rows in map(int, args.rows.split(",")):
        xs = {w.shape[1]: torch.randn(1, rows, w.shape[1]).bfloat16() for w in weights}

        def projections(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                w(xs[w.shape[1]])

        def with_head(xs: dict[int, torch.Tensor] = xs) -> None:
            projections(xs)
            model.head(xs[model.config.hidden_size])

        for name, fn in (("projections", projections), ("projections + LM head", with_head)):
            for _ in range(3):
                fn()
            rounds = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                rounds.append((time.perf_counter() - t) / 20 * 1e3)
            print(f"rows {rows:2d}  {name:22s} {statistics.median(rounds):6.2f} ms")


if __name__ == "__main__":
    main()
