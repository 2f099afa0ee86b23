"""How good are datastore drafts where prompt lookup finds nothing? An offline measurement, no engine.

For each position of AR's greedy output on HumanEval prompts, with the token at that position
known (TiDAR's bonus token), it asks: does prompt lookup (the engine's `lookup_ngram=2`) find a
span in the context? Where it does not, it takes the draft of a `tidar.decode.Datastore` built
from either the training corpus (`corpus:` shard dirs' train.bin, REST-style retrieval) or the
model's own greedy continuations (`generated:` `tidar data generate` dirs, as shipped), and counts
how many of its tokens AR's output confirms, and how long the draft was (rows a step must verify).
Compare with `benchmarks/draft_oracle.py`'s diffusion figure for the steps without a lookup span.

    .venv/bin/python benchmarks/datastore_drafts.py --limit 40 --stores \
        "generated:data/selfgen,data/selfgen-code,data/selfgen-code2,data/selfgen-pkgs;corpus:data/shards" \
        --settings 4,16

Each store (`;`-separated) is `generated:` or `corpus:` and comma-separated directories; all are
measured on the same AR outputs.

Removed with the `datastore_confidence` option (2026-12-06): drafts cut where their tokens' shares
of their n-grams' successors fall below a confidence (the `tokens:confidence` settings, e.g. 16:0.1);
datastore drafts are a fixed length now, so `--settings` lists draft lengths only. The logged
confidence rows stay in results/datastore-drafts-40.log; see docs/operating-point.md.
"""

from __future__ import annotations

import argparse

import numpy as np

from tidar.decode import Datastore, Decoder
from tidar.measure.prompts import load_prompts
from tidar.runtime import Runtime
from tidar.train.loader import TokenShards
from tidar.train.selfgen import from_generated


def has_lookup_span(ctx: list[int], n: int = 2) -> bool:
    """Whether the engine's prompt lookup would draft here: the context's last n tokens occurred
    earlier in it."""
    key = ctx[-n:]
    return any(ctx[j:j + n] == key for j in range(len(ctx) - n))


def confirmed(draft: list[int], future: list[int]) -> int:
    m = 0
    while m < min(len(draft), len(future)) and draft[m] == future[m]:
        m += 1
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--stores", required=True,
                   help="';'-separated datastores, each 'generated:DIR,DIR' (`tidar data generate` output) or "
                        "'corpus:DIR,DIR' (shard dirs' train.bin)")
    p.add_argument("--orders", default="4,3,2", help="datastore n-gram orders")
    p.add_argument("--settings", default="16",
                   help="comma-separated draft lengths (datastore_tokens)")
    args = p.parse_args()
    if ":" in args.settings:
        p.error("--settings takes draft lengths only (e.g. 4,16): datastore_confidence was removed")
    try:
        settings = [int(t) for t in args.settings.split(",")]
    except ValueError:
        p.error(f"--settings must be comma-separated integers, got {args.settings!r}")
    if min(settings) < 1:
        p.error("--settings: draft lengths must be >= 1")
    rt = Runtime.load(None, dtype="bfloat16")
    longest = max(settings)
    positions = []  # (context, AR's next tokens) where prompt lookup has no span
    with_span = 0
    for prompt in load_prompts("humaneval", args.limit, "data/shards"):
        ids = rt.encode(prompt.text, chat=prompt.chat)
        dec = Decoder(rt.model, rt.generation_config(max_new_tokens=128, mode="ar"))
        seq = list(ids) + [t for out in dec.stream([ids]) for t in out[0]]
        for t in range(len(ids), len(seq) - 1):
            ctx = seq[:t + 1]
            if has_lookup_span(ctx):
                with_span += 1
            else:
                positions.append((ctx, seq[t + 1:t + 1 + longest]))
    n = max(len(positions), 1)
    print(f"{args.limit} HumanEval prompts, AR greedy bf16: {with_span} positions with a prompt-lookup span, "
          f"{len(positions)} without")
    for store in args.stores.split(";"):
        kind, _, dirs = store.partition(":")
        if kind == "corpus":
            seqs = []
            for d in dirs.split(","):
                shards = TokenShards(d)
                seqs.append(np.fromfile(shards.path / "train.bin", dtype=shards.dtype).astype(np.int64))
        elif kind == "generated":
            seqs, _ = from_generated(dirs.split(","))
        else:
            p.error(f"a store must start with 'generated:' or 'corpus:', got {store!r}")
        ds = Datastore(seqs, rt.model.config.vocab_size, [int(x) for x in args.orders.split(",")])
        print(f"datastore: {len(ds):,} tokens, {store}, orders {list(ds.orders)}")
        for tokens in settings:
            drafts = [ds.draft(ctx, tokens) for ctx, _ in positions]
            ok = sum(confirmed(d, f) for d, (_, f) in zip(drafts, positions, strict=True))
            print(f"  tokens {tokens:>2}: a draft at {sum(map(bool, drafts))}/{len(positions)}, "
                  f"{ok / n:.2f} tokens confirmed and {sum(map(len, drafts)) / n:.2f} drafted per span-less position")


if __name__ == "__main__":
    main()
