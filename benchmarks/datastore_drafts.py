"""Would drafts retrieved from the training corpus (REST-style n-gram datastore) beat the diffusion
block where prompt lookup finds nothing? An offline measurement, no engine change.

For each position of AR's greedy output on HumanEval prompts, with the token at that position
known (TiDAR's bonus token), it asks: does prompt lookup (the engine's `lookup_ngram=2`) find a
span in the context? Where it does not, the datastore's draft is the continuation of the context's
last n tokens in `data/shards/train.bin` (among up to 2000 occurrences, one whose next token is
the most frequent), and we count how many of its first 8 tokens match AR's output. Compare the
mean with `benchmarks/draft_oracle.py`'s diffusion figure for the steps without a lookup span.

    .venv/bin/python benchmarks/datastore_drafts.py --limit 20
"""

from __future__ import annotations

import argparse

import numpy as np

from tidar.bench import load_prompts
from tidar.data import TokenShards
from tidar.decoding import Decoder
from tidar.runtime import Runtime

DRAFT = 8


def ngram_keys(tokens: np.ndarray, n: int, base: int) -> np.ndarray:
    """One int64 per n-gram (exact for base**n < 2**63, i.e. n <= 4 for a 49K vocabulary)."""
    keys = np.zeros(len(tokens) - n + 1, dtype=np.int64)
    for i in range(n):
        keys = keys * base + tokens[i:len(tokens) - n + 1 + i]
    return keys


def has_lookup_span(ctx: list[int], n: int = 2) -> bool:
    """Whether the engine's prompt lookup would draft here: the context's last n tokens occurred
    earlier in it."""
    key = ctx[-n:]
    return any(ctx[j:j + n] == key for j in range(len(ctx) - n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--data", default="data/shards")
    p.add_argument("--orders", default="3,4", help="datastore n-gram orders to try")
    args = p.parse_args()
    shards = TokenShards(args.data)
    tokens = np.fromfile(shards.path / "train.bin", dtype=shards.dtype).astype(np.int64)
    rt = Runtime.load(None, dtype="bfloat16")
    base = int(tokens.max()) + 1
    orders = [int(x) for x in args.orders.split(",")]
    index = {}
    for n in orders:
        keys = ngram_keys(tokens, n, base)[:-1]  # every key keeps at least one next token
        order = np.argsort(keys, kind="stable")
        index[n] = (keys[order], order)
    with_span = without = 0
    hits = dict.fromkeys(orders, 0)
    matched = dict.fromkeys(orders, 0)
    for prompt in load_prompts("humaneval", args.limit, args.data):
        ids = rt.encode(prompt.text, chat=prompt.chat)
        dec = Decoder(rt.model, rt.generation_config(None, max_new_tokens=128, mode="ar"))
        seq = list(ids) + [t for out in dec.stream([ids]) for t in out[0]]
        for t in range(len(ids), len(seq) - 1):
            ctx, future = seq[:t + 1], seq[t + 1:t + 1 + DRAFT]
            if has_lookup_span(ctx):
                with_span += 1
                continue
            without += 1
            for n in orders:
                if max(ctx[-n:]) >= base:
                    continue
                key = 0
                for v in ctx[-n:]:
                    key = key * base + v
                keys, order = index[n]
                lo, hi = np.searchsorted(keys, key), np.searchsorted(keys, key, side="right")
                if hi == lo:
                    continue
                hits[n] += 1
                occ = order[lo:min(hi, lo + 2000)]
                nxt = tokens[occ + n]
                values, counts = np.unique(nxt, return_counts=True)
                start = occ[nxt == values[counts.argmax()]][0] + n
                draft = tokens[start:start + DRAFT].tolist()
                m = 0
                while m < len(future) and draft[m] == future[m]:
                    m += 1
                matched[n] += m
    print(f"{args.limit} HumanEval prompts, AR greedy bf16: {with_span} positions with a prompt-lookup span, "
          f"{without} without")
    for n in orders:
        print(f"datastore n={n}: a draft at {hits[n]}/{without} span-less positions, {matched[n] / max(hits[n], 1):.2f} "
              f"tokens accepted per draft, {matched[n] / max(without, 1):.2f} per span-less position")


if __name__ == "__main__":
    main()
