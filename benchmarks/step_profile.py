"""Where a decode step's time goes: cProfile of the engine on a few HumanEval prompts, reported per
step (ms per forward after the prefill) for the functions and kernels that take the most. cProfile
adds a few microseconds to every Python call, so Python's share reads high; the kernels' own times
(torch.ops.*, mkldnn) are what the CPU spent in them.

    .venv/bin/python benchmarks/step_profile.py --mode tidar --start 4 --limit 4
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from tidar.decode import Decoder
from tidar.measure.prompts import load_prompts
from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["ar", "tidar"], default="tidar")
    p.add_argument("--start", type=int, default=4)
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=20, help="functions to list, by time spent in them")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rt = Runtime.load(None, dtype="bfloat16")
    prompts = [rt.encode(x.text, chat=x.chat) for x in load_prompts("humaneval", args.start + args.limit)[args.start:]]

    def run() -> int:
        forwards = 0
        for ids in prompts:
            dec = Decoder(rt.model, rt.generation_config(mode=args.mode, max_new_tokens=128))
            for _ in dec.stream([ids]):
                pass
            forwards += dec.stats.forwards
        return forwards

    run()  # warm-up: kernels loaded, weights packed, caches grown
    prof = cProfile.Profile()
    prof.enable()
    steps = run()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, primitive calls, own time, cumulative, callers)
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.top]
    total = sum(v[2] for v in stats.values())
    print(f"{args.mode}: {steps} forwards after prefill, {total / steps * 1e3:.2f} ms of profiled time per forward "
          f"(prefills included); own time per forward:")
    for (file, line, name), (calls, _, own, _, _) in rows:
        where = name if file == "~" else f"{file.split('/src/')[-1]}:{line}({name})"
        print(f"  {own / steps * 1e3:7.3f} ms  {calls / steps:6.1f} calls  {where}")


if __name__ == "__main__":
    main()
