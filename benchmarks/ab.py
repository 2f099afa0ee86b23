"""Same-process A/B of engine variants on HumanEval (or held-out prose) prompts: each variant is a set of
GenerationConfig overrides on top of the shipped operating point (plus "pack": false for plain
F.linear weights, "kernels": false for the engine's PyTorch path instead of `tidar.model.kernels`, and
"adapter_off": ["o", "down"] to run those fused projections without their mask-row adapter, "weights": "q4" or
"dense" for the base projections' path, "amx": false for the Q4_1 kernel's fma path instead of its AMX
tiles, and "model": a model directory to run instead of the shipped one, e.g.
a candidate drafter from `tidar export`), run
interleaved per prompt with the order rotated, so machine noise hits all variants alike. Reports
tokens/s, the ratio to the first variant, tokens and rows per forward, and whether outputs agree.

    .venv/bin/python benchmarks/ab.py --start 20 --limit 20 \
        --variants '{"ar": {"mode": "ar"}, "all": {"policy": "all"}, "default": {}}'
    .venv/bin/python benchmarks/ab.py --limit 12 --variants \
        '{"ar": {"mode": "ar", "pack": false}, "ar+pack": {"mode": "ar"}, "tidar": {"pack": false}, "tidar+pack": {}}'
    .venv/bin/python benchmarks/ab.py --start 80 --limit 16 \
        --variants '{"ar": {"mode": "ar"}, "all": {}, "no_o_down": {"adapter_off": ["o", "down"]}}'
    .venv/bin/python benchmarks/ab.py --limit 24 --variants \
        '{"ar": {"mode": "ar", "weights": "dense"}, "ar-q4": {"mode": "ar", "weights": "q4"}, \
          "tidar": {"weights": "dense"}, "tidar-q4": {"weights": "q4"}}'
    .venv/bin/python benchmarks/ab.py --limit 164 \
        --variants '{"ar": {"mode": "ar"}, "shipped": {}, "new": {"model": "out/candidate"}}'

Variants of the options removed on 2026-12-06 (`span_predraft`, `lookup_occurrence`,
`datastore_confidence`, `policy="topk"`/`policy_k`) can no longer run: GenerationConfig rejects
them. Their recorded A/Bs (e.g. the span_predraft one this script's first example used to run) are
in docs/operating-point.md and benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import time

from tidar.decode import Decoder
from tidar.measure.prompts import Prompt, load_prompts
from tidar.model.transformer import FUSED_PROJECTIONS
from tidar.runtime import Runtime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", required=True, help="JSON object: name -> GenerationConfig overrides")
    p.add_argument("--prompts", choices=["humaneval", "prose", "demo"], default="humaneval",
                   help="demo: `make demo`'s three prompts (use --repeat to time them several times)")
    p.add_argument("--repeat", type=int, default=1, help="run every prompt this many times")
    p.add_argument("--data", default="data/shards", help="shard directory for --prompts prose")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reference", default=None,
                   help="the variant whose outputs the others are compared with (default: the first)")
    args = p.parse_args()
    variants = json.loads(args.variants)
    if args.reference is not None and args.reference not in variants:
        raise SystemExit(f"--reference {args.reference} is not one of the variants ({', '.join(variants)})")
    keys = dict.fromkeys((v.get("model"), v.get("weights")) for v in variants.values())
    runtimes = {(m, w): Runtime.load(m, dtype=args.dtype, weights=w) for m, w in keys}
    rt = next(iter(runtimes.values()))
    if args.prompts == "demo":
        from tidar.demo import PROMPTS

        chosen = [Prompt(text, chat) for _, text, chat in PROMPTS][args.start: args.start + args.limit]
    else:
        chosen = load_prompts(args.prompts, args.start + args.limit, args.data)[args.start:]
    prompts = [rt.encode(x.text, chat=x.chat) for x in chosen for _ in range(args.repeat)]
    names = list(variants)
    # each fused projection's kind ("qkv", "o", ...) and whether it has an adapter to switch off
    kinds = [name for _ in rt.model.layers for _, name, _ in FUSED_PROJECTIONS]
    adapters = {m: [f.has_adapter for _, f, _ in r.model.fused_projections()] for m, r in runtimes.items()}
    totals = {k: {"s": 0.0, "tokens": 0, "forwards": 0, "rows": 0} for k in names}
    outputs: dict[str, list[list[int]]] = {k: [] for k in names}
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:
            overrides = dict(variants[name])
            m = (overrides.pop("model", None), overrides.pop("weights", None))
            rt = runtimes[m]
            amx, off = overrides.pop("amx", True), set(overrides.pop("adapter_off", ()))
            for (_, f, _), kind, has in zip(rt.model.fused_projections(), kinds, adapters[m], strict=True):
                f.has_adapter = has and kind not in off  # off: the projection's base-only path
                if rt.weights == "q4":
                    f.q4.amx = amx
            # packed after the switches: the A rows ride in the q4 call on the AMX path only
            rt.model.pack_weights(overrides.pop("pack", True))
            rt.model.use_kernels(overrides.pop("kernels", True))
            dec = Decoder(rt.model, rt.generation_config(max_new_tokens=args.max_new_tokens, **overrides))
            t = time.perf_counter()
            toks = [tok for out in dec.stream([ids]) for tok in out[0]]
            tot = totals[name]
            tot["s"] += time.perf_counter() - t
            tot["tokens"] += len(toks)
            tot["forwards"] += dec.stats.forwards
            tot["rows"] += dec.stats.query_tokens
            outputs[name].append(toks)
    first = totals[names[0]]["tokens"] / totals[names[0]]["s"]
    print(f"{len(prompts)} {args.prompts} prompts from #{args.start}, {args.dtype}, {args.max_new_tokens} new tokens")
    for name, t in totals.items():
        f = max(t["forwards"], 1)
        ref = args.reference or names[0]
        same = sum(a == b for a, b in zip(outputs[name], outputs[ref], strict=True))
        print(f"{name:>12} {t['tokens'] / t['s']:7.1f} tok/s  x{t['tokens'] / t['s'] / first:.2f}  "
              f"{t['tokens'] / f:.2f} tok/fwd  {t['rows'] / f:5.1f} rows/fwd  {t['s'] / f * 1e3:5.1f} ms/fwd  "
              f"same output as {ref}: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
