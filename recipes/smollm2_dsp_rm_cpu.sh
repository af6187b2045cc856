#!/usr/bin/env bash
# The reward side on SmolLM2-135M-Instruct and the Domain-Specific Preference (DSP) data: a vanilla
# reward model (uniform user model: one reward for everybody) against a personalized one (P-RM,
# individual user model), each domain a user preferring its own domain's answer; 2 CPU cores, under
# an hour:
#   bash recipes/smollm2_dsp_rm_cpu.sh [DSP_FILE] [OUTPUT_DIR] [PDPO_MODEL_DIR]
# DSP_FILE: a JSON list of {"query", "responses": {academy, business, entertainment, literature, normal}}
# (default: the test split in ../shared). The held-out pairs are those of recipes/smollm2_dsp_cpu.sh
# (same conversion and seed), so PDPO_MODEL_DIR (default: outputs/smollm2_dsp/pdpo_individual, when it
# exists) is scored by its implicit reward on the same pairs, in the same table.
# Writes OUTPUT_DIR/report.json (+ report.md, per-user plot) and OUTPUT_DIR/metrics.json.
# PRLHF_RECIPE_OVERRIDES: extra flags for `prlhf rm train`.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp_rm}")
PDPO=$(realpath -m "${3:-outputs/smollm2_dsp/pdpo_individual}")
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
prlhf data convert dsp --input "$INPUT" --output "$OUT/data" --overwrite --rejected-pool domains --format text \
    --test-fraction 0.1 --seed 0
for method in rm_uniform prm_individual; do
    # shellcheck disable=SC2086
    prlhf rm train --config recipes/smollm2_dsp_rm_cpu_$method.yaml --train_file "$OUT/data/train.jsonl" \
        --output_dir "$OUT/$method" ${PRLHF_RECIPE_OVERRIDES:-}
done
models=(--model "$OUT/rm_uniform" --model "$OUT/prm_individual")
if [ -f "$PDPO/prlhf_config.json" ]; then
    models+=(--model "$PDPO")
else
    echo "no P-DPO model at $PDPO (run recipes/smollm2_dsp_cpu.sh first to compare with it)"
fi
prlhf rm eval "${models[@]}" --data "$OUT/data/test.jsonl" --users "$OUT/data/users.json" --batch-size 16 \
    --max-length 80 --max-prompt-length 48 --report "$OUT" --output "$OUT/metrics.json"
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
