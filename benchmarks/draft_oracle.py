"""Which draft source commits the tokens? For each TiDAR step on HumanEval prompts, how many of the
diffusion draft's tokens and of the prompt-lookup span's tokens the final greedy output confirms,
and what an oracle picking the better of the two per step (an upper bound for verifying both as a
tree) would add. Counts only, no timing. "As drafted" is the draft the engine verified: the lookup
span when there is one, else the datastore's draft when it has one (both over the diffusion
draft's first tokens), else the diffusion draft.

    .venv/bin/python benchmarks/draft_oracle.py --limit 25
"""

from __future__ import annotations

import argparse

from tidar.decode import Decoder
from tidar.decode.drafters import Draft, DraftContext
from tidar.decode.drafters.lookup import LookupDrafter
from tidar.measure.prompts import humaneval_problems
from tidar.runtime import Runtime


def agreed(draft: list[int], truth: list[int]) -> int:
    n = 0
    for x, y in zip(draft, truth, strict=False):
        if x != y:
            break
        n += 1
    return n


Record = tuple[int, list[int], list[int], list[int]]


def recording(dec: Decoder, records: list[Record]) -> None:
    """Record, for each draft the decoder picks, where it starts in the history, the diffusion
    draft, the prompt-lookup span (what `LookupDrafter` proposes) and the draft the step verifies."""
    policy = dec.policy
    lookup = next((d for d in policy.copies if isinstance(d, LookupDrafter)), None)
    pick = policy.draft

    def draft(i: int, ctx: DraftContext) -> Draft:
        used = pick(i, ctx)
        # greedy: the diffusion draft is the block's argmax, so asking again gives the same tokens
        diffusion = policy.diffusion.propose(i, ctx).tokens if policy.diffusion and ctx.block_logits is not None else []
        span = lookup.propose(i, ctx) if lookup is not None else None
        records.append((len(ctx.history), diffusion, span.tokens if span else [], used.tokens))
        return used

    policy.draft = draft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    rt = Runtime.load(None, dtype=args.dtype)
    gen = rt.generation_config(max_new_tokens=128)
    if gen.do_sample:
        raise SystemExit("error: the operating point samples; this count assumes greedy decoding")
    records: list[Record] = []
    rows = []
    for problem in humaneval_problems()[: args.limit]:
        records.clear()
        dec = Decoder(rt.model, gen)
        recording(dec, records)
        for _ in dec.stream([rt.encode(problem["prompt"])]):
            pass
        history = dec.state.histories[0]
        for at, diffusion, span, used in records:
            truth = history[at:]
            if truth:
                rows.append((len(span), agreed(diffusion, truth), agreed(span, truth) if span else 0,
                             agreed(used, truth)))
    n = len(rows)
    spans = [r for r in rows if r[0]]
    plain = [r for r in rows if not r[0]]
    print(f"{n} drafts on {args.limit} prompts ({gen.block_size=}, {gen.lookup_tokens=}); confirmed draft "
          f"tokens after the bonus token, per step:")
    print(f"  as drafted (a copy when there is one):      {sum(r[3] for r in rows) / n:.3f}")
    print(f"  oracle, better of diffusion and span:       {sum(max(r[1], r[2]) for r in rows) / n:.3f}")
    print(f"  diffusion draft alone:                      {sum(r[1] for r in rows) / n:.3f}")
    print(f"  steps with a lookup span: {len(spans)} ({len(spans) / n:.0%}); span {sum(r[2] for r in spans) / max(len(spans), 1):.2f}, "
          f"diffusion {sum(r[1] for r in spans) / max(len(spans), 1):.2f}; steps without: "
          f"{sum(r[1] for r in plain) / max(len(plain), 1):.2f}")


if __name__ == "__main__":
    main()
