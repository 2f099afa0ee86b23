#!/usr/bin/env bash
# Build the shipped model's datastore: the AR model's own greedy continuations of corpus, stdlib code/chat
# and networkx/sympy code/chat prompts (`tidar data generate`, resumable): the drafter's training chunks
# 4-7 from scripts/train-smollm2.sh, regenerated here if missing (~25 min each on 2 cores), indexed by
# `tidar datastore build` into src/tidar/assets/smollm2-tidar/datastore.safetensors with the shipped
# operating point (datastore drafts of 4 tokens; chosen by same-process A/Bs, benchmarks/results/ab-datastore-*.log).
# No HumanEval text is in it.
# PKGS2=1 adds 2,400 continuations of the next networkx/sympy prompts (data/selfgen-pkgs2), measured
# and left out: they added nothing on HumanEval (README, "Drafts from the model's own outputs").
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
TIDAR=".venv/bin/tidar"
GEN="--new-tokens 128 --batch-size 64 --no-progress"
[ -f data/shards/index.json ] || $TIDAR data build --sources stdlib,python-doc,bible --out data/shards
[ -f data/selfgen/index.json ] || $TIDAR data generate --shards data/shards --out data/selfgen --samples 4000 \
  --prompt-tokens 64 --new-tokens 192 --batch-size 64 --no-progress
[ -f data/selfgen-code/index.json ] || $TIDAR data generate --prompts code --shards data/shards \
  --out data/selfgen-code --samples 3200 $GEN
[ -f data/selfgen-code2/index.json ] || $TIDAR data generate --prompts code --skip-prompts 3200 \
  --shards data/shards --out data/selfgen-code2 --samples 4000 $GEN
pkgs=$(.venv/bin/python -c 'import os, networkx, sympy; print(",".join(os.path.dirname(m.__file__) for m in (networkx, sympy)))')
[ -f data/selfgen-pkgs/index.json ] || $TIDAR data generate --prompts code --code-source "$pkgs" \
  --shards data/shards --out data/selfgen-pkgs --samples 3000 $GEN
dirs=data/selfgen,data/selfgen-code,data/selfgen-code2,data/selfgen-pkgs
if [ "${PKGS2:-0}" = 1 ]; then
  [ -f data/selfgen-pkgs2/index.json ] || $TIDAR data generate --prompts code --code-source "$pkgs" \
    --skip-prompts 3000 --shards data/shards --out data/selfgen-pkgs2 --samples 2400 $GEN
  dirs="$dirs,data/selfgen-pkgs2"
fi
$TIDAR datastore build --generated "$dirs" --out "${OUT:-src/tidar/assets/smollm2-tidar}" \
  --datastore-tokens "${DATASTORE_TOKENS:-4}" --datastore-confidence "${DATASTORE_CONFIDENCE:-0}"
