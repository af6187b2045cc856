#!/usr/bin/env bash
# Policy or reward model, which to train: on DSP (each domain a user preferring its own domain's answer),
# SmolLM2-135M-Instruct, every setting at its default, 60 steps of 8 pairs each:
#   P-DPO (a policy; its implicit reward scores pairs), the P-RM with the user tokens after the response
#   (the default layout) and before the prompt (prefix), and a vanilla reward model (uniform user model);
# then one table: held-out accuracy per user, training seconds per pair, and the answers each gives a user
# (P-DPO's own greedy answers; each reward model's pick of 8 SmolLM2 samples per prompt), by user match.
#   bash recipes/smollm2_dsp_policy_or_rm.sh [DSP_FILE] [OUTPUT_DIR]
# DSP_FILE: a JSON list of {"query", "responses": {academy, business, entertainment, literature, normal}}
# (default: the shared split in ../shared). Half 2 of the queries (PRLHF_QUERY_HALF, as the defaults recipes).
# Writes OUTPUT_DIR/report.json (+ report.md, generations.jsonl, policy_or_rm.png; OUTPUT_DIR/accuracy: the
# `prlhf rm eval` report). About 60 minutes on 2 CPU cores (measured: docs/results.md).
#
# PRLHF_MODELS_FROM: output folders of earlier runs of recipes/smollm2_dsp_defaults.sh and
# recipes/smollm2_dsp_rm_defaults.sh on the same file and half (space-separated). A model found there
# (pdpo_individual, prm_individual = the after_response P-RM, rm_uniform) is linked instead of trained,
# after checking that its run converted the same training pairs; the others are trained here.
# PRLHF_RECIPE_OVERRIDES: extra flags for every `prlhf train` / `prlhf rm train`; PRLHF_COMPARE_OVERRIDES: for
# `python -m prlhf.experiments.policy_or_rm` (e.g. --best-of 16, or another --sampler).
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp_policy_or_rm}")
HALF=${PRLHF_QUERY_HALF:-2}
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
half_flag=()
[ "$HALF" != "all" ] && half_flag=(--query-half "$HALF")
prlhf data convert dsp --input "$INPUT" --output "$OUT/data" --overwrite --rejected-pool domains --format text \
    --test-fraction 0.2 --seed 0 "${half_flag[@]}"
common=(--model_name_or_path smollm2-135m-instruct --train_file "$OUT/data/train.jsonl" --use_lora true --max_length 80
        --max_prompt_length 48 --max_steps 60 --per_device_train_batch_size 8)
# reuse NAME [NAMES IN AN EARLIER RUN...]: link an earlier run's model trained on the same pairs
reuse() {
    local here=$1 there dir
    shift
    for dir in ${PRLHF_MODELS_FROM:-}; do
        [ "$(realpath -m "$dir")" = "$OUT" ] && continue
        for there in "$here" "$@"; do
            if [ -f "$dir/$there/manifest.json" ] && cmp -s "$dir/data/train.jsonl" "$OUT/data/train.jsonl"; then
                rm -rf "${OUT:?}/$here"
                ln -s "$(realpath "$dir/$there")" "$OUT/$here"
                echo "$here: the model of $dir/$there (the same training pairs), not trained again"
                return 0
            fi
        done
    done
    return 1
}
# shellcheck disable=SC2086
reuse pdpo_individual || prlhf train "${common[@]}" --output_dir "$OUT/pdpo_individual" \
    --user_model individual --reference_cache_dir "$OUT/reference_cache" ${PRLHF_RECIPE_OVERRIDES:-}
# shellcheck disable=SC2086
reuse prm_after_response prm_individual || prlhf rm train "${common[@]}" --output_dir "$OUT/prm_after_response" \
    --user_model individual --user_position after_response ${PRLHF_RECIPE_OVERRIDES:-}
# shellcheck disable=SC2086
reuse prm_prefix || prlhf rm train "${common[@]}" --output_dir "$OUT/prm_prefix" \
    --user_model individual --user_position prefix ${PRLHF_RECIPE_OVERRIDES:-}
# shellcheck disable=SC2086
reuse rm_uniform || prlhf rm train "${common[@]}" --output_dir "$OUT/rm_uniform" \
    --user_model uniform ${PRLHF_RECIPE_OVERRIDES:-}
# shellcheck disable=SC2086
python -m prlhf.experiments.policy_or_rm --policy "$OUT/pdpo_individual" --reward-model "$OUT/prm_after_response" \
    --reward-model "$OUT/prm_prefix" --reward-model "$OUT/rm_uniform" --sampler smollm2-135m-instruct \
    --data "$OUT/data/test.jsonl" --users "$OUT/data/users.json" --best-of 8 --prompts-per-user 8 --max-new-tokens 48 \
    --batch-size 16 --max-length 80 --max-prompt-length 48 --output "$OUT" ${PRLHF_COMPARE_OVERRIDES:-}
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
