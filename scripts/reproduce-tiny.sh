#!/usr/bin/env bash
# Small-scale reproduction of "TiDAR keeps AR quality while drafting": a ~16M-param model trained
# from scratch on the same tokens as (a) pure AR and (b) TiDAR; compare AR-mode validation
# perplexity and (b)'s draft accuracy by offset. Logs: runs/tiny-{ar,tidar}/{train.log,metrics.jsonl}.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
STEPS="${STEPS:-500}"
for objective in ar tidar; do
  out="runs/tiny-$objective"
  mkdir -p "$out"
  .venv/bin/tidar train --config "configs/tiny-$objective.json" max_steps="$STEPS" warmup_steps=50 eval_every=100 \
    eval_batches=16 save_every=100 threads="${THREADS:-2}" progress=false 2>&1 | tee -a "$out/train.log"
done
.venv/bin/tidar plot runs/tiny-ar runs/tiny-tidar --out runs/tiny-reproduction.png
