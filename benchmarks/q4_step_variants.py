"""One engine forward of the shipped model on the Q4_1 path, with and without one of the kernel's
choices, timed interleaved round after round (medians) after a 256-token cached prefix, as TiDAR steps
(a draft, then [MASK] rows: the adapter runs) and as plain verification steps of the same size:

- `--toggle amx`: the AMX tiles vs the AVX-512 fma path for bfloat16 rows;
- `--toggle a_rows`: the adapter's A rows computed in the projection's own q4 call
  (`Q4Weight.with_rows`) vs a separate small matmul.

    .venv/bin/python benchmarks/q4_step_variants.py --toggle a_rows
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tidar.measure.profile import forward_steps
from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toggle", choices=["amx", "a_rows"], required=True)
    p.add_argument("--rows", default="1,4,9,16")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rt = Runtime.load(None, weights="q4")
    fused = [f for _, f, _ in rt.model.fused_projections()]

    # each state's matmuls built once, then swapped in: a re-pack between timings would evict the caches
    states = {}
    for on in (True, False):
        q4 = [dataclasses.replace(f.q4, amx=on or args.toggle != "amx") for f in fused]
        full = [q.with_rows(f.weight[f.a_start:]) if on or args.toggle == "amx" else None
                for q, f in zip(q4, fused, strict=True)]
        states[on] = list(zip(q4, full, strict=True))

    def choose(on: bool) -> None:
        for f, (q4, full) in zip(fused, states[on], strict=True):
            f.q4, f.q4_full = q4, full

    steps = forward_steps(rt.model, [int(r) for r in args.rows.split(",")], prefix=256)
    times: dict[tuple, list[float]] = {}
    with torch.inference_mode():
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for on in (True, False):
                choose(on)
                for key, step in steps.items():
                    t = time.perf_counter()
                    step()
                    if rnd:
                        times.setdefault((on, *key), []).append(time.perf_counter() - t)
    print(f"--toggle {args.toggle}: on / off, ms per forward (median of {args.rounds} rounds)")
    for masks, rows in steps:
        on, off = (statistics.median(times[(o, masks, rows)]) * 1e3 for o in (True, False))
        kind = "TiDAR step" if masks else "plain step"
        print(f"{kind} {rows:>2} rows: on {on:6.1f}  off {off:6.1f}  off/on {off / on:.2f}")


if __name__ == "__main__":
    main()
