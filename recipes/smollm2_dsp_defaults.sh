#!/usr/bin/env bash
# A newcomer's run on DSP: SmolLM2-135M-Instruct with every personalization setting at its default.
#   bash recipes/smollm2_dsp_defaults.sh [DSP_FILE] [OUTPUT_DIR]
# The data are converted as the full recipe converts them (recipes/smollm2_dsp_cpu.sh: four domain
# users, rejected = another domain's answer, plain-text prompts), then `prlhf train` is given only the
# model, the data, the output folder, use_lora, the lengths and the step count (60 steps of 8 pairs),
# once as P-DPO (the default user model, individual) and once as vanilla DPO (user_model none);
# `prlhf eval` scores both on held-out queries. Writes OUTPUT_DIR/report.json (+ report.md,
# metrics.json, plots). About 32 minutes on 2 CPU cores (measured: docs/results.md).
#
# PRLHF_METHODS (default "dpo pdpo_individual"): the methods, in the report's order (the first is the
# baseline of the paired differences). "dpo dpo_user_id pdpo_individual" adds the prompt baseline a
# TRL user tries first: vanilla DPO with the user id written into the prompt; about 10 more minutes
# (past the 40-minute budget of the newcomer's run, hence not by default).
#
# PRLHF_QUERY_HALF (default 2): which half of the file's queries to use (`--query-half`: odd or even
# records). The defaults were chosen on half 1 of the shared DSP file and are reported on half 2;
# "all" uses every query. 20% of a half's queries are held out (the full recipe's 10% of twice the queries).
# PRLHF_RECIPE_OVERRIDES / PRLHF_EVAL_OVERRIDES: extra flags for `prlhf train` / `prlhf eval`.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp_defaults}")
METHODS=${PRLHF_METHODS:-dpo pdpo_individual}
HALF=${PRLHF_QUERY_HALF:-2}
for method in $METHODS; do
    case "$method" in dpo|dpo_user_id|pdpo_individual) ;; *) echo "PRLHF_METHODS: unknown method '$method' (dpo, dpo_user_id, pdpo_individual)" >&2; exit 2;; esac
done
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
half_flag=()
[ "$HALF" != "all" ] && half_flag=(--query-half "$HALF")
prlhf data convert dsp --input "$INPUT" --output "$OUT/data" --overwrite --rejected-pool domains --format text \
    --test-fraction 0.2 --seed 0 "${half_flag[@]}"
models=()
for method in $METHODS; do
    models+=(--model "$OUT/$method")
    user_model=$([ "$method" = pdpo_individual ] && echo individual || echo none)
    in_prompt=$([ "$method" = dpo_user_id ] && echo true || echo false)
    # shellcheck disable=SC2086
    prlhf train --model_name_or_path smollm2-135m-instruct --train_file "$OUT/data/train.jsonl" \
        --output_dir "$OUT/$method" --user_model "$user_model" --user_id_in_prompt "$in_prompt" --use_lora true --max_length 80 --max_prompt_length 48 \
        --max_steps 60 --per_device_train_batch_size 8 --reference_cache_dir "$OUT/reference_cache" ${PRLHF_RECIPE_OVERRIDES:-}
done
# shellcheck disable=SC2086
prlhf eval "${models[@]}" --data "$OUT/data/test.jsonl" \
    --users "$OUT/data/users.json" --batch-size 16 --max-length 80 --max-prompt-length 48 --report "$OUT" \
    --output "$OUT/metrics.json" ${PRLHF_EVAL_OVERRIDES:-}
python -m prlhf.report "$OUT/report.json" --runtime-since "$start"
