"""The Q4_1 kernel's two bfloat16 paths side by side at 1 to 32 rows on SmolLM2's projection shapes: the
AMX tiles (the default where the CPU has them) and the AVX-512 fma path (`amx=False`), plus F.linear on
the dequantized bfloat16 weight. Weights are random Q4_1 blocks; each shape's calls are interleaved, so
the ratios are what to read (the absolute times are for weights that stay in cache).

    .venv/bin/python benchmarks/q4_rows.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from tidar.model import quant

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="1,2,4,9,16,24,32")
    p.add_argument("--repeats", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not quant.available():
        raise SystemExit(f"the Q4_1 kernel is unavailable: {quant.unavailable_reason()}")
    print(f"AMX path available: {quant.amx()}; {args.threads} threads; us per call (median of 5 rounds)")
    g = torch.Generator().manual_seed(0)
    for name, (n, k) in SHAPES.items():
        weight = quant.Q4Weight.from_blocks(quant.quantize_q4_1(torch.randn(n, k, generator=g) * 0.05))
        dense = weight.dequantize().bfloat16()
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, generator=g).bfloat16()
            fns = {"amx": functools.partial(torch.ops.tidar_q4.linear, x, weight.qw, weight.dm, True),
                   "fma": functools.partial(torch.ops.tidar_q4.linear, x, weight.qw, weight.dm, False),
                   "bf16": functools.partial(F.linear, x, dense)}
            rounds: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(6):  # round 0 warms up
                for key, fn in fns.items():
                    rounds[key].append(timed(fn, args.repeats))
            med = {key: statistics.median(v[1:]) for key, v in rounds.items()}
            print(f"{name:>8} {n}x{k} rows {m:>2}: amx {med['amx']:7.1f}  fma {med['fma']:7.1f}  "
                  f"bf16 {med['bf16']:7.1f}  fma/amx {med['fma'] / med['amx']:.2f}")


if __name__ == "__main__":
    main()
