#!/usr/bin/env bash
# Train the shipped TiDAR drafter for SmolLM2 on this CPU, in resumable chunks.
# 1) equal-compute comparison of diffusion targets (ground truth vs self-distillation), 10 min each;
# 2) continue the better one. Every command appends to runs/<name>/train.log; re-running resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
TIDAR=".venv/bin/tidar"
[ -f data/shards/index.json ] || $TIDAR data build --sources stdlib,python-doc,bible --out data/shards
phase="${1:-compare}"
if [ "$phase" = compare ]; then
  for targets in data self; do
    out="runs/smollm2-b4-$targets"
    mkdir -p "$out"
    $TIDAR train --config configs/smollm2-adapter-b4.json targets=$targets out_dir=$out time_limit_min=10 \
      progress=false 2>&1 | tee -a "$out/train.log"
  done
else
  # phase = continue:<targets> <minutes>
  targets="${phase#continue:}"
  out="runs/smollm2-b4-$targets"
  $TIDAR train --config configs/smollm2-adapter-b4.json targets=$targets out_dir=$out time_limit_min="${2:-60}" \
    progress=false 2>&1 | tee -a "$out/train.log"
fi
