"""The reward side on the demo task: a personalized reward model (P-RM) against a vanilla one.

The demo's synthetic conflicting users (70% prefer long answers, 30% short, plus unseen users) and
``tiny-llama``: SFT builds the policy and the reward models' backbone, then a vanilla reward model
(uniform user model: one reward for everybody) and a P-RM (individual user model) are trained with
the same settings and evaluated on held-out pairs; then personalized best-of-n: the SFT policy
samples ``n`` responses per held-out prompt, once, and each reward model picks one per user from
the same candidates. Expected: the P-RM ranks each user's pairs right (the vanilla RM learns the
majority vote) and picks short answers for the minority, long ones for everybody else; the vanilla
RM picks long answers for everybody.

    prlhf rm demo [--output outputs/reward_demo] [--seed 0] [--best-of 8]
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from ..best_of_n import rerank, sample_candidates
from ..config.training import PRMConfig
from ..data import load_preference_data
from ..evaluation import group_of, held_out_prompts, load_user_groups
from ..modeling import PersonalizedLM
from ..report import comparison_table, method_summary, write_report
from ..reward_model import PersonalizedRewardModel, evaluate_reward_accuracy
from ..trainers.callbacks import use_compact_progress
from ..trainers.prm import PRMTrainer
from .demo import common_args, majority_share, report_findings, step_printer, train_sft, write_demo_data

# reward model name -> PRMConfig overrides
REWARD_MODELS = {"rm_uniform": dict(user_model="uniform"), "prm_individual": dict(user_model="individual")}
REWARD_TRAINING = dict(num_train_epochs=4, learning_rate=6e-4, user_learning_rate=3e-2, alpha=0.5, n_user_tokens=4)


def words_per_group(picks: list[dict]) -> dict[str, float]:
    by: dict[str, list[int]] = {}
    for p in picks:
        by.setdefault(p["group"], []).append(len(p["response"].split()))
    return {g: sum(v) / len(v) for g, v in sorted(by.items())}


def run_reward_demo(output: str | Path = "outputs/reward_demo", seed: int = 0, best_of: int = 8, n_users: int = 20,
                    unseen_users: int = 6, pairs_per_user: int = 40, n_prompts: int = 400, sft_epochs: float = 6,
                    prompts_per_user: int = 4, max_new_tokens: int = 60, **train_overrides) -> dict:
    start = time.time()
    step = step_printer()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    step("data: synthetic users, 70% prefer long answers, 30% short, plus unseen users")
    conv, data_dir, _ = write_demo_data(out, seed, n_users, unseen_users, n_prompts, pairs_per_user, pairs_per_user)
    groups = load_user_groups(data_dir / "users.json")
    test = load_preference_data(data_dir / "test.jsonl")
    eval_records = test + load_preference_data(data_dir / "unseen.jsonl")
    share = majority_share(test)

    step("SFT: prompt -> chosen (the best-of-n policy and the reward models' backbone)")
    sft_dir = train_sft(out / "sft", data_dir, seed, sft_epochs)

    step(f"best-of-{best_of} candidates: {best_of} samples per held-out prompt from the SFT policy, drawn once")
    policy = PersonalizedLM.from_pretrained_or_plain(sft_dir)
    items = held_out_prompts(eval_records, prompts_per_user, seed)
    prompts, users = [p for _, p, _ in items], [u for u, _, _ in items]
    torch.manual_seed(seed)
    candidates = sample_candidates(policy, prompts, users, n=best_of, batch_size=16, max_new_tokens=max_new_tokens)
    del policy

    report = {"runtime_seconds": None, "majority_share": share, "seed": seed, "best_of": best_of, "methods": {},
              "best_of_n": {}}
    per_user = {}
    for name, overrides in REWARD_MODELS.items():
        step(f"train {name}")
        args = PRMConfig(model_name_or_path=sft_dir, output_dir=str(out / name), train_file=str(data_dir / "train.jsonl"),
                         **{**common_args(seed), **REWARD_TRAINING, **train_overrides, **overrides})
        trainer = PRMTrainer(args=args)
        use_compact_progress(trainer).train()
        trainer.save_model()
        rm: PersonalizedRewardModel = trainer.model
        step(f"evaluate {name}: reward accuracy and best-of-{best_of}")
        metrics = evaluate_reward_accuracy(rm, eval_records, batch_size=32, max_length=128, max_prompt_length=32)
        report["methods"][name] = method_summary(metrics, metrics["pairs"], None, groups)
        per_user[name] = dict(metrics["accuracy"]["per_user"])
        picks = rerank(rm, prompts, users, candidates, max_length=128, max_prompt_length=32)
        for p, u in zip(picks, users):
            p.update(user_id=u, group=group_of(u, rm, groups))
        words = words_per_group(picks)
        report["methods"][name]["length"] = words  # the table's words columns: best-of-n picks per group
        report["best_of_n"][name] = {"words": words, "mean_reward": sum(p["reward"] for p in picks) / len(picks)}
        with (out / f"best_of_{best_of}_{name}.jsonl").open("w") as f:
            for (uid, prompt, _), p in zip(items, picks):
                f.write(json.dumps({"user_id": uid, "prompt": prompt, **p}, ensure_ascii=False) + "\n")
        del trainer, rm
        gc.collect()
    all_words = [len(c.split()) for cs in candidates for c in cs]
    report["best_of_n"]["candidates_mean_words"] = sum(all_words) / len(all_words)
    report["runtime_seconds"] = time.time() - start
    preamble = (f"Synthetic conflicting preferences, seed {seed}: {n_users} seen users (70% prefer long answers), "
                f"{unseen_users} unseen users; held-out pairs agreeing with the majority: {share:.3f}. Accuracy: reward "
                f"accuracy on held-out pairs (95% bootstrap CI). Words: mean length of the best-of-{best_of} pick per "
                f"user group, from the same {best_of} SFT samples per prompt (candidates: "
                f"{report['best_of_n']['candidates_mean_words']:.1f} words on average). Runtime "
                f"{report['runtime_seconds']:.0f} s.")
    write_report(out, report, None, per_user, groups, title="prlhf rm demo: personalized vs vanilla reward model",
                 preamble=preamble)
    print("\n" + comparison_table(report["methods"]))
    print(f"\nmajority_share {share:.3f}; runtime {report['runtime_seconds']:.0f} s; report in {out}/report.md")
    return report


def check_reward_findings(report: dict) -> dict[str, bool]:
    """The targets of the reward side on the demo task."""
    m, share = report["methods"], report["majority_share"]
    prm, rm = m["prm_individual"], m["rm_uniform"]
    pw, vw = prm["length"], rm["length"]
    if not all(g in w for w in (pw, vw) for g in ("majority", "minority")):  # a run too small to have both groups
        pw = vw = {"majority": float("nan"), "minority": float("nan")}  # the length findings cannot hold
    return {
        "P-RM seen accuracy >= 0.95": prm["accuracy"]["seen"] >= 0.95,
        "vanilla RM seen accuracy within 0.10 of majority_share": abs(rm["accuracy"]["seen"] - share) <= 0.10,
        "P-RM unseen accuracy within 0.10 of the vanilla RM's": (
            None not in (prm["accuracy"]["unseen"], rm["accuracy"]["unseen"])
            and abs(prm["accuracy"]["unseen"] - rm["accuracy"]["unseen"]) <= 0.10),
        "P-RM best-of-n: minority words <= 0.5 x majority": pw["minority"] <= 0.5 * pw["majority"],
        "vanilla RM best-of-n: minority words >= 0.85 x majority": vw["minority"] >= 0.85 * vw["majority"],
    }


def main_reward_demo(output: str = "outputs/reward_demo", seed: int = 0, best_of: int = 8) -> int:
    """``prlhf rm demo``: run it, print and write (``findings.json``) which findings hold."""
    return report_findings(check_reward_findings(run_reward_demo(output, seed=seed, best_of=best_of)), output)
