#!/usr/bin/env bash
# Train the shipped TiDAR drafter for SmolLM2 on this CPU, in resumable chunks.
# 1) equal-compute comparison of diffusion targets (ground truth vs self-distillation), 10 min each;
# 2) continue the better one; 3) `extend <minutes> [<n>]`: a new run runs/smollm2-b4-self-<n> (default 2,
# data-order seed n-1) initialised from the shipped adapter. Every command appends to runs/<name>/train.log;
# re-running resumes. 4) `selfgen <minutes> [<n>]`: the same on shards of the AR model's own greedy continuations of
# corpus prompts (`tidar data generate`, ~17 min for 4,000 samples here, resumable), the text drafts are judged on;
# `selfgen-code <minutes> [<n>]`: the same on continuations of code and chat prompts (data/selfgen-code);
# `selfgen-code2 <minutes> [<n>]`: the same on the next 4,000 code/chat prompts, none of which selfgen-code saw.
# `selfgen-pkgs <minutes> [<n>]`: the same on code/chat prompts of a new kind: functions of two installed
# packages (networkx and sympy, both torch dependencies; test modules left out) instead of the stdlib's.
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
elif [ "$phase" = extend ]; then
  # Checkpoints are not committed, so a later session continues from the shipped adapter itself:
  # a fresh run (new data order: seed 1, short warmup, lower peak lr) initialised from it.
  n="${3:-2}"
  out="runs/smollm2-b4-self-$n"
  mkdir -p "$out"
  $TIDAR train --config configs/smollm2-adapter-b4.json targets=self init=src/tidar/assets/smollm2-tidar \
    out_dir=$out seed=$((n - 1)) lr="${LR:-0.0006}" warmup_steps=10 max_steps="${MAX_STEPS:-450}" time_limit_min="${2:-65}" \
    progress=false 2>&1 | tee -a "$out/train.log"
elif [ "$phase" = selfgen ] || [ "$phase" = selfgen-code ] || [ "$phase" = selfgen-code2 ] || [ "$phase" = selfgen-pkgs ]; then
  if [ "$phase" = selfgen ]; then
    [ -f data/selfgen/index.json ] || $TIDAR data generate --shards data/shards --out data/selfgen --samples 4000 \
      --prompt-tokens 64 --new-tokens 192 --batch-size 64 --no-progress
  elif [ "$phase" = selfgen-pkgs ]; then
    pkgs=$(.venv/bin/python -c 'import os, networkx, sympy; print(",".join(os.path.dirname(m.__file__) for m in (networkx, sympy)))')
    [ -f data/selfgen-pkgs/index.json ] || $TIDAR data generate --prompts code --code-source "$pkgs" \
      --shards data/shards --out data/selfgen-pkgs --samples 3000 --new-tokens 128 --batch-size 64 --no-progress
  elif [ "$phase" = selfgen-code2 ]; then
    [ -f data/selfgen-code2/index.json ] || $TIDAR data generate --prompts code --skip-prompts 3200 \
      --shards data/shards --out data/selfgen-code2 --samples 4000 --new-tokens 128 --batch-size 64 --no-progress
  else
    # Continuations of prompts shaped like the served ones: stdlib functions through their docstrings (HumanEval's
    # shape) and, every 4th, a chat turn asking for that function (~30 min here, resumable).
    [ -f data/selfgen-code/index.json ] || $TIDAR data generate --prompts code --shards data/shards \
      --out data/selfgen-code --samples 3200 --new-tokens 128 --batch-size 64 --no-progress
  fi
  # TARGETS=self-kl distils AR's whole distribution instead of its argmax (run dir gets a -self-kl tag);
  # STOP_AFTER=<steps> ends at a step count rather than a time, for equal-token comparisons.
  # ADAPTER_RANK=<r> widens the shipped rank-32 adapter to rank r first (same function at the start, alpha 2r
  # keeps its scale; run dir gets an -r<r> tag): a capacity experiment.
  n="${3:-4}"
  targets="${TARGETS:-self}"
  rank="${ADAPTER_RANK:-32}"
  out="runs/smollm2-b4-$phase-$n"
  [ "$targets" = self ] || out="runs/smollm2-b4-$phase-$targets-$n"
  [ "$rank" = 32 ] || out="$out-r$rank"
  mkdir -p "$out"
  $TIDAR train --config configs/smollm2-adapter-b4.json targets=$targets init=src/tidar/assets/smollm2-tidar \
    data=data/$phase adapter_rank="$rank" adapter_alpha=$((2 * rank)) out_dir=$out seed=$((n - 1)) lr="${LR:-0.0006}" warmup_steps=10 max_steps="${MAX_STEPS:-500}" \
    stop_after="${STOP_AFTER:-0}" eval_at_start=true eval_batches=8 time_limit_min="${2:-85}" progress=false \
    2>&1 | tee -a "$out/train.log"
else
  # phase = continue:<targets> <minutes>
  targets="${phase#continue:}"
  out="runs/smollm2-b4-$targets"
  $TIDAR train --config configs/smollm2-adapter-b4.json targets=$targets out_dir=$out time_limit_min="${2:-60}" \
    progress=false 2>&1 | tee -a "$out/train.log"
fi
