"""Which draft source where? An offline replay of the engine's draft choice, diffusion block included.

In greedy decoding the output is AR's whatever is drafted, so a policy's forwards can be counted
exactly on AR's outputs (as `copy_policy_sim.py` does for copies). The diffusion block's draft at
any point depends only on the committed prefix: for every position p of AR's output, one batched
forward computes the [MASK] block anchored at p (rows at p..p+b-1, seeing the prefix before p),
exactly what the engine's block for that acceptance would hold; its argmax and top probability
per row are cached (`--blocks`). The replay then runs the engine's own `DraftPolicy` and
`DraftGate` step by step, for one sequence: which blocks a step feeds (`step.predraft_lengths`),
which block serves the next draft (shifted when the acceptance was not pre-drafted), the policy's
feedback (`observe`), and prices each step by a measured latency per row count with and without
[MASK] rows (`--latency`). The estimated speedup is a ranking aid; only a same-process A/B
(`benchmarks/ab.py`) says what is faster.

    .venv/bin/python benchmarks/draft_choice_sim.py --limit 164          # ~5 min on first use (blocks)
    .venv/bin/python benchmarks/draft_choice_sim.py --limit 48 --block-size 4
    .venv/bin/python benchmarks/draft_choice_sim.py --limit 48 \
        --variants '{"shipped": {}, "oracle": {"choice": "oracle"}, "oracle-always": {"choice": "oracle", "feed": "always"}}'
    .venv/bin/python benchmarks/draft_choice_sim.py --ab --start 96 --limit 16 \
        --variants '{"ar": {"mode": "ar"}, "shipped": {}}'   # the real engine: tok/s and accepted tokens by source

The oracle bounds what any per-step choice among the sources' drafts could buy (2026-12-06,
HumanEval 0-47, b=3: 2.83 -> 2.99 tokens/forward, est. 2.61x -> 2.69x AR); an estimate-driven
choice (issue 28) measured no faster than the shipped first-copy rule and was removed
(benchmarks/results/draft-choice-2026-12-06-*; the policy itself: git branch wip-draft-choice).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from tidar.decode import Decoder, step
from tidar.decode.drafters import Draft, DraftContext, DraftPolicy, overlay
from tidar.decode.drafters.diffusion import DraftGate
from tidar.model.transformer import KVCache
from tidar.runtime import Runtime

CHUNK = 64  # anchors per forward


@torch.inference_mode()
def block_drafts(rt: Runtime, prompt: list[int], output: list[int], b: int) -> list[tuple[list[int], list[float]]]:
    """For each output position t: the argmax and top probability of each row of the [MASK] block
    anchored at prompt + t (row 0 at the position of output[t], seeing prompt + output[:t])."""
    model = rt.model
    seq = prompt + output
    n, n_prompt = len(seq), len(prompt)
    anchors = list(range(n_prompt, n))
    out: list[tuple[list[int], list[float]]] = []
    for c in range(0, len(anchors), CHUNK):
        chunk = anchors[c: c + CHUNK]
        T = len(chunk) * b
        cache = KVCache(model.config, 1, n + T, next(model.parameters()).dtype)
        ids = torch.tensor([seq])
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        model(ids, torch.arange(n)[None], causal, cache=cache, offset=0, return_hidden=True)
        attn = torch.zeros(1, 1, T, n + T, dtype=torch.bool)
        pos = torch.zeros(1, T, dtype=torch.long)
        for k, p in enumerate(chunk):
            rows = slice(k * b, (k + 1) * b)
            attn[0, 0, rows, :p] = True
            attn[0, 0, rows, n + k * b: n + (k + 1) * b] = True
            pos[0, rows] = torch.arange(p, p + b)
        masks = torch.full((1, T), model.config.mask_token_id)
        hidden = model(masks, pos, attn, cache=cache, offset=n, return_hidden=True)
        probs = model.head(hidden).float().softmax(-1)[0]  # (T, V)
        top, arg = probs.max(-1)
        for k in range(len(chunk)):
            rows = slice(k * b, (k + 1) * b)
            out.append((arg[rows].tolist(), [round(x, 4) for x in top[rows].tolist()]))
    return out


def load_blocks(rt: Runtime, data: dict, b: int, path: Path, limit: int) -> list:
    cached = json.loads(path.read_text()) if path.exists() else {"b": b, "prompts": []}
    if cached["b"] != b:
        raise SystemExit(f"error: {path} holds blocks of b={cached['b']}, not {b}")
    for i in range(len(cached["prompts"]), limit):
        row = data["prompts"][i]
        cached["prompts"].append(block_drafts(rt, row["prompt"], row["output"], b))
        if i % 16 == 15 or i == limit - 1:
            path.write_text(json.dumps(cached) + "\n")
            print(f"blocks: {i + 1}/{limit} prompts", flush=True)
    return cached["prompts"]


def fake_logits(tokens: list[int], probs: list[float], vocab: int) -> torch.Tensor:
    """(b, V) logits whose argmax and top probability are these (the rest of the mass spread evenly)."""
    p = torch.tensor(probs, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
    x = ((1 - p) / (vocab - 1)).log()[:, None].expand(len(tokens), vocab).clone()
    x[torch.arange(len(tokens)), torch.tensor(tokens)] = p.log()
    return x


def matched(draft: list[int], future: list[int]) -> int:
    m = 0
    while m < len(draft) and m < len(future) and draft[m] == future[m]:
        m += 1
    return m


class Prices:
    """Seconds of a forward by rows, with and without [MASK] rows, plus the engine's own cost per
    step beyond the forward (Python, the LM head, drafting), which differs for AR and TiDAR steps."""

    def __init__(self, latency: dict, overhead: float, ar_overhead: float) -> None:
        self.masked = {int(k): v for k, v in latency["latency_s"].items()}
        self.plain = {int(k): v for k, v in latency["latency_plain_s"].items()}
        self.overhead, self.ar_overhead = overhead, ar_overhead

    def __call__(self, rows: int, masked: bool) -> float:
        from tidar.measure.profile import interpolate

        return interpolate(self.masked if masked else self.plain, rows) + self.overhead

    @property
    def ar(self) -> float:
        return self(1, False) - self.overhead + self.ar_overhead


def replay(dec: Decoder, prompt: list[int], out: list[int], blocks: list, prices: Prices, tally: dict,
           always: bool = False) -> None:
    """One sequence through the engine's draft choice on AR's output `out`; adds to `tally`."""
    cfg, b, policy = dec.cfg, dec.b, dec.policy
    vocab = dec.model.config.vocab_size
    hist = list(prompt) + out[:1]
    policy.add([0], [list(prompt)])
    policy.extend(0, hist, len(prompt))
    gate = DraftGate(cfg.min_draft_gain, b, 1) if cfg.min_draft_gain > 0 else None
    draft = policy.draft(0, DraftContext(hist, fake_logits(*blocks[0], vocab), b - 1))
    t = 1  # out[t - 1] is the bonus token d_1 of `draft`
    while t < len(out):
        n_draft = 1 + len(draft.tokens)
        fed: tuple[int, ...] = ()
        if not (gate and gate.closed):
            fed = step.predraft_lengths(cfg.policy, b, n_draft, [n_draft], [draft.source], [False])
            if always:  # an experiment: every step feeds blocks, whatever the draft
                fed = tuple(a for a in sorted({1, b, n_draft} if cfg.policy == "full" else {*range(1, b + 1), n_draft})
                            if a <= n_draft)
        if gate:
            gate.tick()
        a = min(1 + matched(draft.tokens, out[t:]), len(out) - t + 1)
        rows = n_draft + b * len(fed)
        tally["s"] += prices(rows, bool(fed))
        tally["forwards"] += 1
        tally["rows"] += rows
        tally["masked"] += bool(fed)
        tally["tokens"] += min(a, len(out) - t)
        for s in draft.sources()[: a - 1]:
            tally["by_source"][s] += 1
        policy.observe(0, draft.sources(), a - 1)
        if gate:
            gate.update(torch.tensor([a]), [draft.source], [False])
        start = len(hist)
        hist.extend(out[t: t + a])
        policy.extend(0, hist, start)
        t += a
        if t >= len(out):
            break
        ctx = DraftContext(hist, None, 0)
        if fed:
            base = max(x for x in fed if x <= a)
            shift = a - base
            tokens, probs = blocks[t - 1 - shift]  # the block anchored base tokens after d_1
            rows_ = [min(r + shift, b - 1) for r in range(b)]
            ctx = DraftContext(hist, fake_logits([tokens[r] for r in rows_], [probs[r] for r in rows_], vocab),
                               max(b - 1 - shift, 0))
        policy.future = out[t:]
        draft = policy.draft(0, ctx)
    policy.remove([0])


def truncate(copy: Draft, k: int) -> Draft:
    return Draft(copy.tokens[:k], copy.source, None, copy.sources()[:k])


class Oracle(DraftPolicy):
    """Upper bound on choosing per step: of the diffusion draft, each copy and each copy's prefix
    (alone or over the diffusion draft's first tokens), the one AR's output accepts furthest."""

    def draft(self, key: int, ctx: DraftContext) -> Draft:
        base = self.diffusion.propose(key, ctx) if self.diffusion and ctx.block_logits is not None else None
        copies = [c for c in (s.propose(key, ctx) for s in self.copies) if c is not None and c.tokens]
        cands = [base] if base is not None else []
        for c in copies:
            cands += [f(truncate(c, k)) for k in range(1, len(c.tokens) + 1) for f in (lambda d: d, lambda d: overlay(base, d))]
        fut = getattr(self, "future", [])
        return max(cands, key=lambda d: (matched(d.tokens, fut), -len(d.tokens)), default=Draft([], "none"))


def run(rt: Runtime, data: dict, blocks: list, prices: Prices, overrides: dict) -> dict:
    """`overrides`: GenerationConfig options, plus "choice": "oracle" (`Oracle`, else the engine's
    policy) and "feed": "always" (every step feeds [MASK] blocks)."""
    overrides = dict(overrides)
    choice = overrides.pop("choice", "shipped")
    always = overrides.pop("feed", None) == "always"
    dec = Decoder(rt.model, rt.generation_config(max_new_tokens=128, **overrides))
    if choice == "oracle":
        dec.policy = Oracle(dec.policy.diffusion, dec.policy.copies)
    tally = {"s": 0.0, "forwards": 0, "rows": 0, "masked": 0, "tokens": 0, "by_source": Counter()}
    ar_s = 0.0
    for row, blk in zip(data["prompts"], blocks, strict=False):
        replay(dec, row["prompt"], row["output"], blk, prices, tally, always)
        ar_s += prices.ar * (len(row["output"]) - 1)
    f = tally["forwards"]
    return {"tokens_per_forward": tally["tokens"] / f, "rows_per_forward": tally["rows"] / f,
            "masked_share": tally["masked"] / f, "est_speedup": ar_s / tally["s"],
            "accepted": dict(tally["by_source"])}


def make_decoder(rt: Runtime, overrides: dict) -> Decoder:
    """A real engine with these GenerationConfig overrides on the operating point."""
    return Decoder(rt.model, rt.generation_config(max_new_tokens=128, **overrides))


def ab(rt: Runtime, data: dict, variants: dict, start: int, out: Path | None) -> None:
    """Same-process A/B on the real engine: variants interleaved per prompt, order rotated; each
    output compared with AR's recorded one and, with an "ar" variant, this process's own. One
    engine per variant lives across prompts, as in a server."""
    names = list(variants)
    decs = {k: make_decoder(rt, v) for k, v in variants.items()}
    tot = {k: {"s": 0.0, "tokens": 0, "forwards": 0, "rows": 0, "equal": 0, "accepted": Counter()} for k in names}
    rows = data["prompts"]
    outs: dict[str, list[list[int]]] = {k: [] for k in names}
    for dec in decs.values():  # warm-up (weight packing, allocator), untimed
        for _ in dec.stream([rows[0]["prompt"]]):
            pass
    for i, row in enumerate(rows):
        for name in names[i % len(names):] + names[: i % len(names)]:
            dec, t = decs[name], tot[name]
            t0 = time.perf_counter()
            toks = [tok for o in dec.stream([row["prompt"]]) for tok in o[0]]
            t["s"] += time.perf_counter() - t0
            t["tokens"] += len(toks)
            t["forwards"] += dec.stats.forwards
            t["rows"] += dec.stats.query_tokens
            t["equal"] += toks == row["output"]  # AR's recorded output
            outs[name].append(toks)
            t["accepted"].update({k: v for k, v in dec.stats.accepted_drafts.items() if v})
    report = {"prompts": [start, start + len(rows)], "variants": variants, "results": {}}
    for name, t in tot.items():
        f = max(t["forwards"], 1)
        r = {"tok_s": t["tokens"] / t["s"], "tokens_per_forward": t["tokens"] / f, "rows_per_forward": t["rows"] / f,
             "ms_per_forward": t["s"] / f * 1e3, "equal_to_ar": t["equal"], "n": len(rows),
             "accepted": dict(t["accepted"]), "tokens": t["tokens"], "forwards": t["forwards"], "s": t["s"]}
        if "ar" in outs:  # this process's own AR outputs (the recorded ones may predate engine changes)
            r["equal_to_ar_here"] = sum(a == b for a, b in zip(outs[name], outs["ar"], strict=True))
        report["results"][name] = r
        print(f"{name:<16} {r['tok_s']:6.1f} tok/s {r['tokens_per_forward']:.3f} tok/fwd {r['rows_per_forward']:5.1f} "
              f"rows/fwd {r['ms_per_forward']:5.1f} ms/fwd  equal to AR (recorded {t['equal']}, "
              f"this process {r.get('equal_to_ar_here', '-')})/{len(rows)}  "
              f"accepted: {dict(sorted(t['accepted'].items()))}", flush=True)
    if out:
        out.write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", default="benchmarks/results/ar-humaneval-bf16.json",
                   help="AR greedy outputs, as `copy_policy_sim.py` writes them")
    p.add_argument("--latency", default="benchmarks/results/profile-bf16.json",
                   help="a `tidar profile --json` file: latency_s (with [MASK] rows) and latency_plain_s by rows")
    p.add_argument("--overhead-ms", type=float, default=0.0, help="engine cost per TiDAR step beyond the forward")
    p.add_argument("--ar-overhead-ms", type=float, default=0.0, help="engine cost per AR step beyond the forward")
    p.add_argument("--blocks", default=None, help="cache of the block drafts (default: /tmp/tidar-blocks-b{b}.json)")
    p.add_argument("--block-size", type=int, default=3)
    p.add_argument("--start", type=int, default=0, help="--ab: first prompt")
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--ab", action="store_true", help="time the variants on the real engine instead of replaying")
    p.add_argument("--json", type=Path, default=None, help="--ab: write the report here")
    p.add_argument("--variants", default='{"shipped": {}}', help="JSON: name -> GenerationConfig overrides")
    args = p.parse_args()
    torch.set_num_threads(2)
    rt = Runtime.load(None, dtype="bfloat16")
    data = json.loads(Path(args.outputs).read_text())
    if args.ab:
        data["prompts"] = data["prompts"][args.start: args.start + args.limit]
        return ab(rt, data, json.loads(args.variants), args.start, args.json)
    data["prompts"] = data["prompts"][: args.limit]
    b = args.block_size
    blocks = load_blocks(rt, data, b, Path(args.blocks or f"/tmp/tidar-blocks-b{b}.json"), args.limit)
    prices = Prices(json.loads(Path(args.latency).read_text()), args.overhead_ms / 1e3, args.ar_overhead_ms / 1e3)
    print(f"{args.limit} HumanEval prompts, b={b}, AR {prices.ar * 1e3:.1f} ms/step")
    for name, ov in json.loads(args.variants).items():
        r = run(rt, data, blocks, prices, {"block_size": b, **ov})
        acc = ", ".join(f"{k} {v}" for k, v in sorted(r["accepted"].items()))
        print(f"{name:<24} {r['tokens_per_forward']:.3f} tok/fwd {r['rows_per_forward']:5.1f} rows/fwd "
              f"{r['masked_share']:4.0%} masked  est. {r['est_speedup']:.2f}x AR  accepted: {acc}", flush=True)


if __name__ == "__main__":
    main()
