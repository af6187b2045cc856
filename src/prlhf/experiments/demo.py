"""The demo: the paper's central finding on a laptop, offline, in a few minutes.

Synthetic conflicting preferences (70% of users prefer long answers, 30% short, plus users
absent from training), ``tiny-llama``, SFT, then vanilla DPO, DPO with the user id in the prompt,
P-DPO with the individual and the cluster user model, then evaluation. Expected, as in the paper
(Li et al. 2024, Section 5.1): vanilla DPO learns the majority vote (its accuracy is about the
majority's share of the comparisons, and everybody gets long answers); P-DPO learns each user
(high accuracy, short answers for the minority) and serves unseen users with the generic,
majority-like behaviour.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

from ..base_models import load_model_and_tokenizer
from ..behaviour import build_matcher
from ..config.training import PDPOConfig, PersonalizationConfig, PSFTConfig
from ..data import load_preference_data
from ..evaluation import evaluate_accuracy, evaluate_generation, load_user_groups
from ..modeling import PersonalizedLM
from ..reference import reference_identity
from ..report import comparison_table, method_summary, write_report
from ..sources import synthesize, write_conversion
from ..trainers.callbacks import use_compact_progress
from ..trainers.pdpo import PDPOTrainer
from ..trainers.sft import PSFTTrainer
from ..users import UserRegistry

logger = logging.getLogger(__name__)

# method name -> PDPOConfig overrides
METHODS = {
    "dpo": dict(user_model="none"),
    "dpo_user_id": dict(user_model="none", user_id_in_prompt=True),
    "pdpo_individual": dict(user_model="individual"),
    "pdpo_cluster": dict(user_model="cluster", n_clusters=4),
}
# P-DPO settings shared by every method of the demo
DEMO_TRAINING = dict(num_train_epochs=6, learning_rate=6e-4, user_learning_rate=3e-2, beta=0.1, alpha=0.5,
                     n_user_tokens=4, sft_weight=0.1)
# the paper's ablations: T_u in {1, 10} and alpha = 1 (no generic term) next to the default alpha = 0.5
ABLATIONS = {
    "pdpo_individual_tu1": dict(user_model="individual", n_user_tokens=1),
    "pdpo_individual_tu10": dict(user_model="individual", n_user_tokens=10),
    "pdpo_individual_alpha1": dict(user_model="individual", alpha=1.0),
}


def common_args(seed: int) -> dict:
    return dict(report_to="none", use_cpu=True, seed=seed, save_strategy="no", logging_steps=20, disable_tqdm=False,
                max_length=128, max_prompt_length=32, per_device_train_batch_size=16, dataloader_num_workers=0)


def step_printer():
    """A progress line printer: ``step(msg)`` prints the seconds since it was made, then ``msg``."""
    start = time.time()

    def step(msg: str) -> None:
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    return step


def write_demo_data(out: Path, seed: int, n_users: int, unseen_users: int, n_prompts: int, pairs_per_user: int,
                    unseen_pairs_per_user: int, with_texts: bool = False):
    """The demo task's synthetic users (70% prefer long answers, 30% short, plus unseen users)
    written under ``out/data`` (and, ``with_texts``, the same pairs with every user's profile text
    under ``out/data_text``). Returns (conversion, data folder, text folder or None)."""
    synth = dict(n_users=n_users, unseen_users=unseen_users, majority_share=0.7, n_prompts=n_prompts,
                 pairs_per_user=pairs_per_user, test_fraction=0.2, seed=seed, unseen_pairs_per_user=unseen_pairs_per_user)
    conv = synthesize(**synth)
    data_dir = write_conversion(conv, out / "data", overwrite=True)
    text_dir = write_conversion(synthesize(**synth, user_texts=True), out / "data_text", overwrite=True) if with_texts else None
    return conv, data_dir, text_dir


def train_sft(output_dir: Path, data_dir: Path, seed: int, epochs: float) -> str:
    """The demo's SFT step: tiny-llama on prompt -> chosen of ``data_dir/train.jsonl``; returns its folder."""
    sft = PSFTTrainer(args=PSFTConfig(model_name_or_path="tiny-llama", output_dir=str(output_dir),
                                      train_file=str(data_dir / "train.jsonl"), learning_rate=3e-3,
                                      num_train_epochs=epochs, **common_args(seed)))
    use_compact_progress(sft).train()
    return sft.save_final()


def majority_share(records: list[dict]) -> float:
    """Share of pairs whose label agrees with the majority's preference (chosen is the longer)."""
    agree = [len(str(r["chosen"]).split()) > len(str(r["rejected"]).split()) for r in records]
    return sum(agree) / len(agree)


def words_by_group(generations: list[dict], groups: dict[str, str]) -> dict[str, float]:
    """Mean words of generations per user group of ``users.json`` (majority / minority), seen or not."""
    by: dict[str, list[int]] = {}
    for g in generations:
        by.setdefault(groups.get(str(g["user_id"]), "all"), []).append(g["n_words"])
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def run_cold_start(out: Path, data_dir: Path, text_dir: Path, reference, groups: dict[str, str], report: dict,
                   seed: int, step, generate_per_user: int = 4, train_overrides: dict | None = None) -> dict:
    """New users (the demo's unseen users) served three ways: few-shot adaptation of the trained
    individual and cluster models from k = 0..32 of their pairs (random and active choice), and,
    with no pairs at all, from a profile text (a model trained with every user's text)."""
    from ..adapt import training_objective
    from .cold_start import accuracy_by_group, learning_curves, pairs_to_match, split_new_users

    test = load_preference_data(data_dir / "test.jsonl")
    unseen = load_preference_data(data_dir / "unseen.jsonl")
    pools, held_out = split_new_users(unseen, {json.dumps(r["prompt"]) for r in test})
    eval_kwargs = dict(batch_size=32, max_length=128, max_prompt_length=32)
    cold = {"seen_accuracy": None, "text_only_accuracy": None, "curves": {}, "ci": {}, "by_group": {},
            "active_vs_random": {}, "new_users": len(pools), "held_out_pairs": len(held_out),
            "pool_pairs_per_user": {u: len(p) for u, p in sorted(pools.items())}}
    for kind in ("individual", "cluster"):
        name = f"pdpo_{kind}"
        if name not in report["methods"]:
            continue
        step(f"cold start, {name}: adapt new users from k = 0..32 pairs (random and active choice)")
        model = PersonalizedLM.from_pretrained(out / name)
        curves = learning_curves(model, pools, held_out, reference, groups=groups, seed=seed,
                                 objective=training_objective(out / name), eval_kwargs=eval_kwargs,
                                 generate_at=8, generate_per_user=generate_per_user, max_new_tokens=60)
        cold["curves"][kind] = curves["curves"]
        cold["ci"][kind] = curves["ci"]
        cold["by_group"][kind] = curves["by_group"]
        cold["active_vs_random"][kind] = pairs_to_match(curves["curves"])
        cold.setdefault("words_k8", {})[kind] = curves.get("words")
        cold.setdefault("seconds_per_adaptation", {})[kind] = curves["seconds"]
        cold.setdefault("seen_accuracy_by_model", {})[kind] = report["methods"][name]["accuracy"]["seen"]
        del model
    if "individual" in cold["seen_accuracy_by_model"]:
        cold["seen_accuracy"] = cold["seen_accuracy_by_model"]["individual"]

    step("cold start, text only: P-DPO (individual) trained with every user's profile text; unseen users with and without text")
    args = PDPOConfig(model_name_or_path=str(out / "sft"), reference_model_name_or_path=str(out / "sft"),
                      output_dir=str(out / "pdpo_individual_text"), train_file=str(text_dir / "train.jsonl"),
                      **{**common_args(seed), **DEMO_TRAINING, **(train_overrides or {}), "user_model": "individual"})
    trainer = PDPOTrainer(args=args, reference_model=reference)
    use_compact_progress(trainer).train()
    trainer.save_model()
    model = trainer.model
    unseen_text = load_preference_data(text_dir / "unseen.jsonl")
    no_text = [dict(r, user_text=None) for r in unseen_text]
    with_text = evaluate_accuracy(model, unseen_text, reference, **eval_kwargs)
    without = evaluate_accuracy(model, no_text, reference, **eval_kwargs)
    seen_text = evaluate_accuracy(model, load_preference_data(text_dir / "test.jsonl"), reference, **eval_kwargs)
    cold["text_only_accuracy"] = with_text["accuracy"]["unseen"]
    cold["text_only_ci"] = with_text["accuracy"]["ci"]["unseen"]
    cold["no_text_accuracy"] = without["accuracy"]["unseen"]
    cold["no_text_ci"] = without["accuracy"]["ci"]["unseen"]
    cold["text_model_seen_accuracy"] = seen_text["accuracy"]["seen"]
    cold["text_only_by_group"] = {label: accuracy_by_group(acc["pairs"], groups)
                                  for label, acc in (("text", with_text), ("no_text", without))}
    gen_text = evaluate_generation(model, unseen_text, n_per_user=generate_per_user, groups=groups, batch_size=32,
                                   max_new_tokens=60)
    gen_none = evaluate_generation(model, no_text, n_per_user=generate_per_user, groups=groups, batch_size=32,
                                   max_new_tokens=60)
    cold["text_only_words"] = {"text": words_by_group(gen_text["generations"], groups),
                               "no_text": words_by_group(gen_none["generations"], groups)}
    del trainer, model
    gc.collect()
    return cold


def run_demo(output: str | Path = "outputs/demo", seed: int = 0, ablations: bool = False, n_users: int = 20,
             unseen_users: int = 6, pairs_per_user: int = 40, generate_per_user: int = 4,
             methods: list[str] | None = None, sft_epochs: float = 6, n_prompts: int = 400, cold_start: bool = True,
             unseen_pairs_per_user: int = 60, **train_overrides) -> dict:
    """Run the demo; ``train_overrides`` change the P-DPO settings of every method (see ``DEMO_TRAINING``)."""
    start = time.time()
    step = step_printer()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    step("data: synthetic users, 70% prefer long answers, 30% short, plus unseen users")
    # with profile texts too for the cold-start part's text-only users
    conv, data_dir, text_dir = write_demo_data(out, seed, n_users, unseen_users, n_prompts, pairs_per_user,
                                               unseen_pairs_per_user, with_texts=cold_start)
    print(conv.summary_table(), flush=True)
    groups = load_user_groups(data_dir / "users.json")
    test = load_preference_data(data_dir / "test.jsonl")
    unseen = load_preference_data(data_dir / "unseen.jsonl")
    eval_records = test + unseen
    share = majority_share(test)
    matcher = build_matcher(load_preference_data(data_dir / "train.jsonl"), groups)

    step("SFT: prompt -> chosen, no user input (pi_SFT, the reference of every method)")
    sft_dir = train_sft(out / "sft", data_dir, seed, sft_epochs)
    reference, _ = load_model_and_tokenizer(sft_dir)
    reference.eval()

    report = {"runtime_seconds": None, "majority_share": share, "seed": seed, "methods": {}}
    generations, per_user, ref_caches = {}, {}, {}

    def evaluate(name: str, model: PersonalizedLM) -> None:
        step(f"evaluate {name}: implicit-reward accuracy and generation")
        ref_cache = ref_caches.setdefault(reference_identity(model), {})  # the SFT reference, scored once
        acc = evaluate_accuracy(model, eval_records, reference, batch_size=32, max_length=128, max_prompt_length=32,
                                ref_cache=ref_cache)
        gen = evaluate_generation(model, eval_records, n_per_user=generate_per_user, groups=groups, batch_size=32,
                                  max_new_tokens=60)
        report["methods"][name] = method_summary(acc, acc["pairs"], gen, groups, matcher, groups)
        generations[name] = gen["generations"]
        per_user[name] = dict(acc["accuracy"]["per_user"])

    # the SFT model itself: policy = reference, every pair a tie
    llm, tok = load_model_and_tokenizer(sft_dir)
    sft_model = PersonalizedLM(llm, tok, UserRegistry.from_records(load_preference_data(data_dir / "train.jsonl")),
                               PersonalizationConfig(sft_dir, user_model="none"), None)
    evaluate("sft", sft_model)
    del sft_model, llm

    chosen = list(METHODS) if methods is None else methods
    todo = {m: METHODS[m] for m in chosen} | (ABLATIONS if ablations else {})
    for name, overrides in todo.items():
        step(f"train {name}")
        args = PDPOConfig(model_name_or_path=sft_dir, reference_model_name_or_path=sft_dir, output_dir=str(out / name),
                          train_file=str(data_dir / "train.jsonl"),
                          **{**common_args(seed), **DEMO_TRAINING, **train_overrides, **overrides})
        trainer = PDPOTrainer(args=args, reference_model=reference)
        use_compact_progress(trainer).train()
        trainer.save_model()
        evaluate(name, trainer.model)
        del trainer
        gc.collect()

    if cold_start:
        report["cold_start"] = run_cold_start(out, data_dir, text_dir, reference, groups, report, seed, step,
                                              generate_per_user, train_overrides)

    report["runtime_seconds"] = time.time() - start
    table = comparison_table(report["methods"])
    preamble = (f"Synthetic conflicting preferences, seed {seed}: {n_users} seen users (70% prefer long answers), "
                f"{unseen_users} unseen users. Held-out pairs agreeing with the majority: {share:.3f}. "
                f"Accuracy: implicit-reward accuracy on held-out pairs (95% bootstrap CI); words: mean length of "
                f"greedy generations per user group. Runtime {report['runtime_seconds']:.0f} s.")
    write_report(out, report, generations, per_user, groups, title="prlhf demo: personalized vs vanilla DPO",
                 preamble=preamble)
    print("\n" + table)
    if cold_start:
        from ..report import cold_start_table

        cs = report["cold_start"]
        print("\nNew users, held-out accuracy after adapting on k labelled pairs each (k = 0: the generic user):\n"
              + cold_start_table(cs))
        print(f"seen users {cs['seen_accuracy']:.3f}; text only (no pairs) {cs['text_only_accuracy']:.3f}, "
              f"the same users without text {cs['no_text_accuracy']:.3f}")
    print(f"\nmajority_share {share:.3f}; runtime {report['runtime_seconds']:.0f} s; report in {out}/report.md")
    return report


def check_findings(report: dict) -> dict[str, bool]:
    """The paper's findings, as the demo must reproduce them."""
    m, share = report["methods"], report["majority_share"]
    out = {}
    for name in ("pdpo_individual", "pdpo_cluster"):
        if name in m:
            length = m[name]["length"]
            out[f"{name}: seen accuracy >= 0.90"] = m[name]["accuracy"]["seen"] >= 0.90
            out[f"{name}: minority length <= 0.25 x majority"] = length.get("minority", 0) <= 0.25 * length["majority"]
            out[f"{name}: unseen length >= 0.75 x majority"] = length.get("unseen", 0) >= 0.75 * length["majority"]
    if "dpo" in m:
        out["dpo: seen accuracy within 0.10 of majority_share"] = abs(m["dpo"]["accuracy"]["seen"] - share) <= 0.10
    cs = report.get("cold_start")
    if cs and "individual" in cs.get("curves", {}) and cs.get("seen_accuracy") is not None:
        k8 = cs["curves"]["individual"]["random"].get("8")
        out["cold start: new users at k = 8 within 0.05 of seen users (individual)"] = (
            k8 is not None and k8 >= cs["seen_accuracy"] - 0.05)
        words = (cs.get("words_k8") or {}).get("individual") or {}
        if "minority" in words and "majority" in words:
            out["cold start: minority new users short at k = 8 (<= 0.25 x majority)"] = (
                words["minority"] <= 0.25 * words["majority"])
        out["cold start: text-only users >= 0.85"] = (cs.get("text_only_accuracy") or 0) >= 0.85
    out["runtime <= 600 s"] = report["runtime_seconds"] <= 600
    return out


def main_demo(output: str, seed: int, ablations: bool) -> int:
    return report_findings(check_findings(run_demo(output, seed=seed, ablations=ablations)), output)


def report_findings(checks: dict[str, bool], output: str) -> int:
    """Print which findings hold, as a table, and write them to ``output/findings.json``."""
    print("\n| finding | holds |\n|---|---|")
    for k, v in checks.items():
        print(f"| {k} | {'yes' if v else 'NO'} |")
    Path(output, "findings.json").write_text(json.dumps(checks, indent=1))
    return 0
