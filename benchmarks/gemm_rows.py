"""Cost of SmolLM2-135M's matmuls by number of query rows, bf16, this CPU: is a 12-token step free?

    .venv/bin/python benchmarks/gemm_rows.py

Prints microseconds per F.linear for 1, 3, 12 and 20 rows for each projection shape (and the LM head).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down_proj": (576, 1536),
          "lm_head": (49152, 576)}
ROWS = (1, 3, 12, 20)


def microseconds(fn, n: int = 300) -> float:  # noqa: ANN001
    for _ in range(20):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    dt = torch.bfloat16
    print(f"{'shape':>10} " + " ".join(f"{f'T={r}':>8}" for r in ROWS) + "   (us per matmul, bf16)")
    per_layer = dict.fromkeys(ROWS, 0.0)
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, dtype=dt)
        xs = {r: torch.randn(1, r, in_f, dtype=dt) for r in ROWS}
        us = {r: microseconds(lambda x=xs[r], w=w: F.linear(x, w)) for r in ROWS}
        if name != "lm_head":
            for r in ROWS:
                per_layer[r] += us[r]
        print(f"{name:>10} " + " ".join(f"{us[r]:>8.0f}" for r in ROWS))
    print(f"{'30 layers':>10} " + " ".join(f"{per_layer[r] * 30 / 1e3:>7.1f}m" for r in ROWS) + "   (ms per step)")


if __name__ == "__main__":
    main()
