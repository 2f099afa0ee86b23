"""Batch > 1: aggregate tokens/s of AR and TiDAR by batch size, same process, interleaved.

The prompts are split into groups of B and each group is decoded as one batch (`generate` with B
prompts, ragged acceptance handled per sequence); every variant runs every group, in rotated
order, so machine noise hits all alike. Reports the aggregate tokens/s over all groups, the ratio
to AR at the same batch size and to AR at batch 1, rows per sequence per forward (a batch's
forward has B times as many; shorter drafts are padded to the batch's longest), and
how many outputs equal AR's at batch 1 (greedy output does not depend on the batch: `tidar.model.kernels`'
attention gives a row the same bits whatever slots its keys sit in).

"tidar" needs {"max_draft_batch": 0} to draft at every batch size: the shipped operating point
decodes batches past its `max_draft_batch` (chosen from this benchmark) as AR.

    .venv/bin/python benchmarks/batch_throughput.py --limit 24 --batch-sizes 1,2,3,4,6,8
    .venv/bin/python benchmarks/batch_throughput.py --limit 16 --batch-sizes 1,2,4,8 --variants \
        '{"ar": {"mode": "ar"}, "tidar": {"max_draft_batch": 0}, "short": {"max_draft_batch": 0, "lookup_tokens": 2}}'
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tidar.decode import generate
from tidar.measure.prompts import load_prompts
from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default='{"ar": {"mode": "ar"}, "tidar": {"max_draft_batch": 0}}',
                   help="JSON object: name -> GenerationConfig overrides; the first must be AR")
    p.add_argument("--batch-sizes", default="1,2,4,8")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = json.loads(args.variants)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    rt = Runtime.load(None, dtype=args.dtype)
    chosen = load_prompts("humaneval", args.start + args.limit)[args.start:]
    prompts = [rt.encode(x.text, chat=x.chat) for x in chosen]
    names = list(variants)
    if variants[names[0]].get("mode") != "ar":
        raise SystemExit("error: the first variant must be AR (--variants '{\"ar\": {\"mode\": \"ar\"}, ...}')")
    configs = {n: rt.generation_config(max_new_tokens=args.max_new_tokens, **v) for n, v in variants.items()}
    for n in names:  # warm-up: first-call costs (kernels, allocator) out of the timings
        generate(rt.model, prompts[:2], configs[n])
    print(f"{len(prompts)} HumanEval prompts from {args.start}, {args.max_new_tokens} new tokens, {args.dtype}, "
          f"{args.threads} threads; variants {variants}", flush=True)

    reference: list[list[int]] | None = None  # AR's outputs at batch 1
    ar1 = None
    for B in sizes:
        groups = [prompts[i: i + B] for i in range(0, len(prompts), B)]
        wall = dict.fromkeys(names, 0.0)
        tokens = dict.fromkeys(names, 0)
        rows = dict.fromkeys(names, 0)
        forwards = dict.fromkeys(names, 0)
        outs: dict[str, list[list[int]]] = {n: [] for n in names}
        for g, group in enumerate(groups):
            order = names[g % len(names):] + names[: g % len(names)]
            for n in order:
                t = time.perf_counter()
                out = generate(rt.model, group, configs[n])
                wall[n] += time.perf_counter() - t
                tokens[n] += sum(len(s) for s in out.sequences)
                rows[n] += out.stats.query_tokens
                forwards[n] += out.stats.forwards
                outs[n].extend(out.sequences)
        if reference is None:
            reference = outs[names[0]]
        ar_tps = tokens[names[0]] / wall[names[0]]
        ar1 = ar1 or ar_tps
        for n in names:
            tps = tokens[n] / wall[n]
            same = sum(a == b for a, b in zip(outs[n], reference, strict=True))
            print(f"B={B:<2} {n:<14} {tps:7.1f} tok/s  {tps / ar_tps:5.2f}x AR at B={B}  {tps / ar1:5.2f}x AR at B=1  "
                  f"{rows[n] / max(forwards[n], 1):5.1f} rows/seq/fwd  {same}/{len(reference)} equal to AR at B=1",
                  flush=True)


if __name__ == "__main__":
    main()
