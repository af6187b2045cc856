#!/usr/bin/env bash
# A newcomer's reward model on DSP: SmolLM2-135M-Instruct, every personalization setting at its default.
#   bash recipes/smollm2_dsp_rm_defaults.sh [DSP_FILE] [OUTPUT_DIR]
# The data are converted as recipes/smollm2_dsp_defaults.sh converts them (the same half and split),
# then `prlhf rm train` is given only the model, the data, the output folder, use_lora, the lengths and
# the step count (60 steps of 8 pairs), once as a P-RM (the default user model, individual; the default
# layout, after_response) and once as a vanilla reward model (user_model uniform: one reward for
# everybody); `prlhf rm eval` scores both on the held-out queries. Writes OUTPUT_DIR/report.json
# (+ report.md, metrics.json). PRLHF_QUERY_HALF (default 2) as in smollm2_dsp_defaults.sh.
# PRLHF_RECIPE_OVERRIDES: extra flags for `prlhf rm train`.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp_rm_defaults}")
HALF=${PRLHF_QUERY_HALF:-2}
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
half_flag=()
[ "$HALF" != "all" ] && half_flag=(--query-half "$HALF")
prlhf data convert dsp --input "$INPUT" --output "$OUT/data" --overwrite --rejected-pool domains --format text \
    --test-fraction 0.2 --seed 0 "${half_flag[@]}"
for method in rm_uniform prm_individual; do
    user_model=$([ "$method" = rm_uniform ] && echo uniform || echo individual)
    # shellcheck disable=SC2086
    prlhf rm train --model_name_or_path smollm2-135m-instruct --train_file "$OUT/data/train.jsonl" \
        --output_dir "$OUT/$method" --user_model "$user_model" --use_lora true --max_length 80 --max_prompt_length 48 \
        --max_steps 60 --per_device_train_batch_size 8 ${PRLHF_RECIPE_OVERRIDES:-}
done
prlhf rm eval --model "$OUT/rm_uniform" --model "$OUT/prm_individual" --data "$OUT/data/test.jsonl" \
    --users "$OUT/data/users.json" --batch-size 16 --max-length 80 --max-prompt-length 48 --report "$OUT" \
    --output "$OUT/metrics.json"
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
