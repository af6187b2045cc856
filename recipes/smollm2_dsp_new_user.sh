#!/usr/bin/env bash
# A new user on a real model: SmolLM2-135M-Instruct P-DPO trained on three DSP domains, the fourth
# domain a user it has never seen, learned from k = 0, 2, 4, 8, 16, 32 of its pairs.
#   bash recipes/smollm2_dsp_new_user.sh [DSP_FILE] [OUTPUT_DIR]
# Steps: two conversions of the same queries (the new user kept out, and every domain a training
# user: the same held-out queries, the same pairs); P-DPO without the new user; P-DPO with it (the
# "fully trained" user); the prompt baseline (vanilla DPO with the user id in the prompt) without it;
# then `python -m prlhf.experiments.new_user`: the new user's held-out accuracy after `prlhf adapt`
# on k of its pairs (random and active choice), next to the fully trained user and the prompt
# baseline trained further on the same k pairs. Writes OUTPUT_DIR/report.json (new_user.accuracy_by_k,
# new_user.fully_trained_accuracy, new_user.gap_closed, baseline.accuracy_by_k), report.md, a plot.
#
# PRLHF_NEW_USER (default literature): the domain that plays the new user (academy, business,
#   entertainment, literature).
# PRLHF_QUERY_HALF (default 2): the half of the file's queries (`--query-half`; "all": every query).
# PRLHF_ADAPT_STEPS (default 10): optimizer steps per adaptation and per baseline fine-tuning.
# PRLHF_RECIPE_OVERRIDES: extra flags for the three `prlhf train` runs (the tests use a tiny model).
# Settings, and why:
# - P-DPO at its defaults with the DSP defaults recipe's model, lengths, LoRA and 60 steps of 8 pairs,
#   plus alpha_sampling (each pair under one term drawn with probability alpha: the same expected
#   loss at half the step cost; the DSP recipe's lever, +0.27 over vanilla DPO in its run 2), so
#   that three trainings and eleven adaptations fit in about an hour on 2 CPU cores;
# - 10 adaptation steps of min(k, 16) pairs: the adaptation moves only the new user's offset, at
#   the adaptation rate (the training's user rate, 3e-2); the baseline gets the same pairs, steps and
#   batch for its LoRA weights at its own training rate.
set -euo pipefail
INPUT=$(realpath "${1:-$(dirname "$0")/../../shared/data/dsp/domain_preference_shared.json}")
OUT=$(realpath -m "${2:-outputs/smollm2_dsp_new_user}")
NEW=${PRLHF_NEW_USER:-literature}
HALF=${PRLHF_QUERY_HALF:-2}
STEPS=${PRLHF_ADAPT_STEPS:-10}
case "$NEW" in academy|business|entertainment|literature) ;; *) echo "PRLHF_NEW_USER: not a DSP domain: '$NEW'" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
start=$(date +%s.%N)
half_flag=()
[ "$HALF" != "all" ] && half_flag=(--query-half "$HALF")
convert() {  # folder, extra flags
    local folder=$1; shift
    prlhf data convert dsp --input "$INPUT" --output "$OUT/$folder" --overwrite --rejected-pool domains --format text \
        --test-fraction 0.2 --seed 0 "${half_flag[@]}" "$@"
}
convert data_without_new_user --unseen-users "$NEW"
convert data_all_users
train() {  # output folder, train file, extra flags
    local folder=$1 file=$2; shift 2
    # shellcheck disable=SC2086
    prlhf train --model_name_or_path smollm2-135m-instruct --train_file "$file" --output_dir "$OUT/$folder" \
        --use_lora true --max_length 80 --max_prompt_length 48 --max_steps 60 --per_device_train_batch_size 8 \
        --reference_cache_dir "$OUT/reference_cache" "$@" ${PRLHF_RECIPE_OVERRIDES:-}
}
train pdpo_without_new_user "$OUT/data_without_new_user/train.jsonl" --user_model individual --alpha_sampling true
train pdpo_all_users "$OUT/data_all_users/train.jsonl" --user_model individual --alpha_sampling true
train dpo_user_id_without_new_user "$OUT/data_without_new_user/train.jsonl" --user_model none --user_id_in_prompt true
python -m prlhf.experiments.new_user --model "$OUT/pdpo_without_new_user" --full-model "$OUT/pdpo_all_users" \
    --baseline "$OUT/dpo_user_id_without_new_user" --new-users "$OUT/data_without_new_user/unseen.jsonl" \
    --held-out-prompts "$OUT/data_without_new_user/test.jsonl" --ks 0,2,4,8,16,32 --steps "$STEPS" --batch-size 16 \
    --max-length 80 --max-prompt-length 48 --output "$OUT"
python - "$OUT/report.json" "$start" <<'EOF'
import json, sys, time
path, start = sys.argv[1], float(sys.argv[2])
report = json.load(open(path))
report["runtime_seconds"] = time.time() - start  # the whole recipe: conversions, three trainings, the curves
json.dump(report, open(path, "w"), indent=1)
print(f"runtime {report['runtime_seconds']:.0f} s, recorded in {path}")
EOF
