"""Quick start: P-DPO on two users with opposite preferences, a tiny model, 2 CPU cores, offline.

"long_fan" prefers long answers, "short_fan" short ones, on the same prompts. Vanilla DPO sees
every comparison with both labels and can learn neither; P-DPO learns a user embedding each.
Writes data, models and results under ``outputs/quickstart``.

    python examples/quickstart.py
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path

from prlhf import (PDPOConfig, PDPOTrainer, PersonalizedLM, PSFTConfig, PSFTTrainer, evaluate_accuracy,
                   load_preference_data)

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
WORDS = ("the a dog cat house tree river sun moon day night big small good bad old new red blue green "
         "runs walks sleeps eats sees likes happy quiet bright dark fast slow").split()


def make_data(path: Path, n_prompts: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_prompts):
            prompt = "Q: tell me about the " + " ".join(rng.choices(WORDS, k=3)) + "\nA:"
            short = " " + " ".join(rng.choices(WORDS, k=rng.randint(2, 4)))
            long = " " + " ".join(rng.choices(WORDS, k=rng.randint(14, 20)))
            for user in ("long_fan", "short_fan"):
                chosen, rejected = (long, short) if user == "long_fan" else (short, long)
                f.write(json.dumps({"user_id": user, "prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def main() -> None:
    start = time.time()
    OUT.mkdir(parents=True, exist_ok=True)
    make_data(OUT / "train.jsonl", 48, seed=0)
    make_data(OUT / "test.jsonl", 12, seed=1)
    test = load_preference_data(OUT / "test.jsonl")
    print("== SFT: prompt -> chosen, no user input (builds pi_SFT) ==", flush=True)
    sft = PSFTTrainer(args=PSFTConfig(
        model_name_or_path="tiny-llama", output_dir=str(OUT / "sft"), train_file=str(OUT / "train.jsonl"),
        learning_rate=3e-3, num_train_epochs=12, per_device_train_batch_size=16, logging_steps=24,
        save_strategy="no", report_to="none", use_cpu=True, seed=0,
    ))
    sft.train()
    sft_dir = sft.save_final()
    rows = {}
    for name, user_model in (("vanilla DPO", "none"), ("P-DPO individual", "individual")):
        args = PDPOConfig(
            model_name_or_path=sft_dir, output_dir=str(OUT / user_model), train_file=str(OUT / "train.jsonl"),
            user_model=user_model, n_user_tokens=4, alpha=0.5, beta=0.1, learning_rate=1e-3, user_learning_rate=1e-2,
            num_train_epochs=4, per_device_train_batch_size=8, logging_steps=12, save_strategy="no",
            report_to="none", use_cpu=True, seed=0,
        )
        print(f"== training {name} ==", flush=True)
        trainer = PDPOTrainer(args=args)
        trainer.train()
        trainer.save_model()
        model = PersonalizedLM.from_pretrained(args.output_dir)
        acc = evaluate_accuracy(model, test, trainer.reference_for_eval())["accuracy"]["per_user"]
        prompts = sorted({r["prompt"] for r in test})[:6]
        lengths = {}
        for user in ("long_fan", "short_fan"):
            texts = model.generate(prompts, [user] * len(prompts), max_new_tokens=40, do_sample=False)
            lengths[user] = statistics.mean(len(t.split()) for t in texts)
            print(f"   {user}: {texts[0]!r}")
        rows[name] = (acc, lengths)
    print("\n| method | accuracy long_fan | accuracy short_fan | words long_fan | words short_fan |")
    print("|---|---|---|---|---|")
    for name, (acc, lengths) in rows.items():
        print(f"| {name} | {acc['long_fan']:.2f} | {acc['short_fan']:.2f} | {lengths['long_fan']:.1f} | {lengths['short_fan']:.1f} |")
    print(f"\nheld-out pairs: {len(test)}; finished in {time.time() - start:.0f} s; models in {OUT}/")


if __name__ == "__main__":
    main()
