"""Where a TiDAR step's [MASK] rows cost time: one forward of --rows new tokens after a cached
prefix, as a TiDAR step (a draft token, then [MASK] rows, so the adapter runs) and as a plain
verification step of the same size (no adapter work), timed interleaved (medians), then both under
torch.profiler, listing the ops whose self time per forward differs. Run on an idle machine.

    .venv/bin/python benchmarks/mask_row_cost.py --models default,out/candidate-r64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tidar.masks import causal_mask, with_prefix
from tidar.model import KVCache, Transformer
from tidar.weights import load_model


def steps(model: Transformer, prefix: int, rows: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The two forwards, on one cache holding `prefix` random tokens; both write the same slots after it."""
    cache = KVCache(model.config, 1, prefix + rows, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size - 1
    ids = torch.randint(0, vocab, (1, prefix), generator=g)
    model(ids, torch.arange(prefix)[None], causal_mask(prefix), cache=cache, offset=0, return_hidden=True)
    cache.valid[:, :prefix] = True
    cache.truncate(prefix)
    pos = torch.arange(prefix, prefix + rows)[None]
    mask = with_prefix(causal_mask(rows), cache.valid[:, :prefix])
    plain = torch.randint(0, vocab, (1, rows), generator=g)
    tidar = plain.clone()
    tidar[:, 1:] = model.config.mask_token_id
    return {name: (lambda x=x: model(x, pos, mask, cache=cache, offset=prefix, return_hidden=True))
            for name, x in (("tidar", tidar), ("plain", plain))}


def op_times(fn: Callable[[], torch.Tensor], n: int) -> dict[str, float]:
    """Self CPU milliseconds per call of fn, by op."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            fn()
    return {e.key: e.self_cpu_time_total / 1e3 / n for e in prof.key_averages()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default", help="comma-separated model dirs ('default': the shipped one)")
    p.add_argument("--rows", type=int, default=8, help="new tokens per forward (a b=3 'full' step feeds ~8-9)")
    p.add_argument("--prefix", type=int, default=256)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    if a.rows < 2 or a.prefix < 1 or a.repeats < 5 or a.threads < 1:
        sys.exit("error: --rows must be >= 2, --prefix and --threads >= 1, --repeats >= 5")
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    for name in names:
        if name != "default" and not Path(name).is_dir():
            sys.exit(f"error: model directory {name} not found (export one with `tidar export RUN --out DIR`)")
    torch.set_num_threads(a.threads)
    for name in names:
        model = load_model(None if name == "default" else name, dtype=torch.bfloat16).fuse_for_inference()
        rank = model.config.adapter.rank if model.has_adapter else 0
        with torch.inference_mode():
            fns = steps(model, a.prefix, a.rows)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(a.repeats + 3):  # 3 warm-up rounds
                for k, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    if r >= 3:
                        times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            ops = {k: op_times(fn, a.repeats) for k, fn in fns.items()}
        print(f"{name} (adapter rank {rank}), {a.rows} new rows after {a.prefix} cached, {a.threads} threads, bf16:")
        print(f"  forward: plain {med['plain']:.2f} ms, with [MASK] rows {med['tidar']:.2f} ms "
              f"(+{med['tidar'] - med['plain']:.2f} ms, x{med['tidar'] / med['plain']:.3f})")
        diff = {k: ops["tidar"].get(k, 0.0) - ops["plain"].get(k, 0.0) for k in ops["tidar"].keys() | ops["plain"].keys()}
        total = sum(ops["tidar"].values()) - sum(ops["plain"].values())
        print(f"  profiled self time per forward, [MASK] minus plain: {total:+.2f} ms, of which")
        for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
            if abs(d) >= 0.05:
                print(f"    {k:<32} {d:+.2f} ms  ({ops['plain'].get(k, 0.0):.2f} -> {ops['tidar'].get(k, 0.0):.2f})")


if __name__ == "__main__":
    main()
