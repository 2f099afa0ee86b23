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

from tidar.model.weights import WeightsError, load_model
from tidar.train.config import TrainConfig
from tidar.train.errors import DataError
from tidar.train.loader import TokenShards
from tidar.train.validation import evaluate


def _block_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"block sizes must be >= 1, got {text!r}")
    return sizes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="default", help="comma-separated model dirs ('default': the shipped one)")
    p.add_argument("--data", default="data/shards", help="comma-separated shard directories")
    p.add_argument("--batches", type=int, default=8, help="eval batches of 8 x 256 tokens per shard directory")
    p.add_argument("--block-sizes", type=_block_sizes, default=[],
                   help="comma-separated block sizes (default: each model's own)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for b in args.block_sizes:
        if args.seq_len % b:
            p.error(f"--seq-len {args.seq_len} is not a multiple of block size {b}")
    try:
        val = {data: TokenShards(data).split("val") for data in args.data.split(",")}  # read once, for every model
        models = {name: load_model(None if name == "default" else name, dtype=torch.float32)
                  for name in args.models.split(",")}  # every path checked before the first long eval
    except (DataError, WeightsError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{'model':>36} {'data':>14}  acc vs AR argmax by offset   accept_est")
    for name, model in models.items():
        for data, tokens in val.items():
            for b in args.block_sizes or [model.config.block_size]:
                cfg = TrainConfig(block_size=b, seq_len=args.seq_len, batch_size=8, eval_batches=args.batches,
                                  dtype="bfloat16")
                ev = evaluate(model, tokens, cfg)
                accs = " ".join(f"{a:.3f}" for a in ev["val_acc_ar"])
                label = f"{name} b={b}" if args.block_sizes else name
                print(f"{label:>36} {data:>14}  {accs}   {ev['val_accept_est']:.3f}", flush=True)


if __name__ == "__main__":
    main()
