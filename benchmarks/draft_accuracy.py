"""Teacher-forced draft accuracy of drafter(s) on shard directories' val splits, side by side: accuracy
vs the AR model's argmax by offset in the block, and `accept_est` (tokens a pass would commit).

    .venv/bin/python benchmarks/draft_accuracy.py --models default,out/candidate --data data/shards,data/selfgen
    .venv/bin/python benchmarks/draft_accuracy.py --data data/selfgen-code2 --block-sizes 4,3 --seq-len 252

`--block-sizes` evaluates each drafter with [MASK] blocks of those sizes, whatever size it was trained
at (the decoder may run a b=4 drafter at b=3); a --seq-len divisible by all of them keeps the windows
identical.
"""

from __future__ import annotations

import argparse

import torch

from tidar.data import TokenShards
from tidar.train import TrainConfig, evaluate
from tidar.weights import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default", help="comma-separated model dirs ('default': the shipped one)")
    p.add_argument("--data", default="data/shards", help="comma-separated shard directories")
    p.add_argument("--batches", type=int, default=8, help="eval batches of 8 x 256 tokens per shard directory")
    p.add_argument("--block-sizes", default="", help="comma-separated block sizes (default: each model's own)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'model':>36} {'data':>14}  acc vs AR argmax by offset   accept_est")
    for name in args.models.split(","):
        model = load_model(None if name == "default" else name, dtype=torch.float32)
        sizes = [int(b) for b in args.block_sizes.split(",")] if args.block_sizes else [model.config.block_size]
        for data in args.data.split(","):
            for b in sizes:
                if args.seq_len % b:
                    raise SystemExit(f"error: --seq-len {args.seq_len} is not a multiple of block size {b}")
                cfg = TrainConfig(block_size=b, seq_len=args.seq_len, batch_size=8, eval_batches=args.batches,
                                  dtype="bfloat16")
                ev = evaluate(model, TokenShards(data).split("val"), cfg)
                accs = " ".join(f"{a:.3f}" for a in ev["val_acc_ar"])
                label = f"{name} b={b}" if args.block_sizes else name
                print(f"{label:>36} {data:>14}  {accs}   {ev['val_accept_est']:.3f}", flush=True)


if __name__ == "__main__":
    main()
