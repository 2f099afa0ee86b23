"""Which draft source commits the tokens? For each TiDAR step on HumanEval prompts, how many of the
diffusion draft's tokens and of the prompt-lookup span's tokens the final greedy output confirms,
and what an oracle picking the better of the two per step (an upper bound for verifying both as a
tree) would add. Counts only, no timing.

    .venv/bin/python benchmarks/draft_oracle.py --limit 25
"""

from __future__ import annotations

import argparse

from tidar.decode.engine import Decoder
from tidar.measure.bench import humaneval_problems
from tidar.runtime import Runtime


def agreed(draft: list[int], truth: list[int]) -> int:
    n = 0
    for x, y in zip(draft, truth, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=25)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    rt = Runtime.load(None, dtype=args.dtype)
    gen = rt.generation_config(None, max_new_tokens=128)
    records: list[tuple[int, list[int], list[int], list[int]]] = []
    lookup = Decoder._lookup_drafts

    def recording(self: Decoder, drafts, q):  # noqa: ANN001, ANN202
        at, diffusion = len(self.history[0]), drafts[0, 1:].tolist()
        out, q = lookup(self, drafts, q)
        records.append((at, diffusion, self._continuation(0, self.max_draft - 1), out[0, 1:].tolist()))
        return out, q

    Decoder._lookup_drafts = recording
    rows = []
    for problem in humaneval_problems()[: args.limit]:
        records.clear()
        dec = Decoder(rt.model, gen)
        for _ in dec.stream([rt.encode(problem["prompt"])]):
            pass
        history = dec.history[0]
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
    print(f"  as drafted (lookup span when there is one): {sum(r[3] for r in rows) / n:.3f}")
    print(f"  oracle, better of diffusion and span:       {sum(max(r[1], r[2]) for r in rows) / n:.3f}")
    print(f"  diffusion draft alone:                      {sum(r[1] for r in rows) / n:.3f}")
    print(f"  steps with a lookup span: {len(spans)} ({len(spans) / n:.0%}); span {sum(r[2] for r in spans) / max(len(spans), 1):.2f}, "
          f"diffusion {sum(r[1] for r in spans) / max(len(spans), 1):.2f}; steps without: "
          f"{sum(r[1] for r in plain) / max(len(plain), 1):.2f}")


if __name__ == "__main__":
    main()
