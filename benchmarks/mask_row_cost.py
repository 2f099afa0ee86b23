"""Where a TiDAR step's [MASK] rows cost time: one engine forward of --rows new tokens after a
cached prefix, as a TiDAR step (a draft token, then [MASK] rows, so the adapter runs) and as a plain
verification step of the same size (no adapter work), timed interleaved as `tidar profile` times
them (`tidar.measure.profile.latency_profiles`, medians), then both under torch.profiler (taking turns), listing the ops
whose self time per forward differs. Run on an idle machine.

    .venv/bin/python benchmarks/mask_row_cost.py --models default,out/candidate-r64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tidar.measure.profile import forward_steps, latency_profiles
from tidar.model.weights import load_model


def op_times(fns: dict[str, Callable[[], None]], n: int, chunk: int = 5) -> dict[str, dict[str, float]]:
    """Self CPU milliseconds per call of each fn, by op: profiled `chunk` calls at a time, taking
    turns, so a drift of the machine hits every fn alike."""
    totals: dict[str, dict[str, float]] = {k: {} for k in fns}
    for fn in fns.values():
        fn()  # warm-up: a fresh cache's first write allocates
    for _ in range(max(1, n // chunk)):
        for k, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(chunk):
                    fn()
            for e in prof.key_averages():
                totals[k][e.key] = totals[k].get(e.key, 0.0) + e.self_cpu_time_total / 1e3
    calls = max(1, n // chunk) * chunk
    return {k: {op: t / calls for op, t in ops.items()} for k, ops in totals.items()}


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
        prof = latency_profiles(model, [a.rows], a.prefix, a.repeats)  # interleaved, medians
        med = {"tidar": prof[True][a.rows] * 1e3, "plain": prof[False][a.rows] * 1e3}
        with torch.inference_mode():
            fns = forward_steps(model, [a.rows], a.prefix)
            ops = op_times({"tidar": fns[(True, a.rows)], "plain": fns[(False, a.rows)]}, a.repeats)
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
