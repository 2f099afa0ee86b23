#!/usr/bin/env bash
# Every measurement in the README's results section, in order. Run on an otherwise idle machine
# (each report records the other processes' CPU share); takes about 80 minutes on 2 cores.
# `bash scripts/bench-all.sh profile|humaneval|fp32|prose|compiled` runs one part.
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/tidar
R=benchmarks/results
mkdir -p "$R"
part="${1:-all}"
run() { [ "$part" = all ] || [ "$part" = "$1" ]; }
if run profile; then
  # forward latency by query tokens, and the operating point from measured acceptance (eager engine)
  $T profile --dtype bfloat16 --no-compile --tokens 1,2,4,8,12,16,20,24,32,48 --repeats 7 --choose \
    --choose-block-sizes 2,3,4 --lookup-ngram 2 --choose-lookup-tokens 0,8,12,16 --json $R/profile-bf16.json
  $T profile --dtype bfloat16 --compile --tokens 1,2,4,8,12,16,20,24,32,48 --repeats 7 --json $R/profile-bf16-compiled.json
fi
if run humaneval; then  # all 164 prompts, every baseline in one process
  $T bench --prompts humaneval --methods ar,tidar,tidar-no-datastore,hf,hf-lookup,llamacpp --max-new-tokens 128 \
    --dtype bfloat16 --threads 2 --json $R/humaneval-bf16.json --plots $R/humaneval-bf16 \
    --profile $R/profile-bf16.json --no-progress | tee $R/humaneval-bf16.log
fi
if run fp32; then  # output equality where rounding cannot flip near-ties
  $T bench --prompts humaneval --methods ar,tidar --max-new-tokens 128 --dtype float32 --threads 2 \
    --json $R/humaneval-fp32.json --no-progress | tee $R/humaneval-fp32.log
fi
if run prose; then
  $T bench --prompts prose --data data/shards --limit 20 --methods ar,tidar,tidar-no-datastore --max-new-tokens 128 \
    --dtype bfloat16 --threads 2 --json $R/prose-bf16.json --no-progress | tee $R/prose-bf16.log
fi
if run compiled; then  # what torch.compile (opt-in) does to the same engine
  $T bench --prompts humaneval --limit 20 --methods ar,tidar --max-new-tokens 128 --dtype bfloat16 --threads 2 \
    --compile --json $R/humaneval-bf16-compiled.json --no-progress | tee $R/humaneval-bf16-compiled.log
fi
