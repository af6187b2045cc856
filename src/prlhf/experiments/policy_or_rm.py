"""Policy or reward model: which to train. One table of a P-DPO policy and personalized reward models
trained on the same pairs: held-out accuracy per user (the policy by its implicit reward), training
seconds per pair, and what each gives a user at generation time (the policy's own greedy answers; a
reward model's best-of-n pick among a sampler's answers), scored by the user-match rate.

    python -m prlhf.experiments.policy_or_rm --policy OUT/pdpo_individual \\
        --reward-model OUT/prm_after_response --reward-model OUT/prm_prefix --reward-model OUT/rm_uniform \\
        --sampler smollm2-135m-instruct --data OUT/data/test.jsonl --users OUT/data/users.json --output OUT/compare

- Accuracy: ``prlhf rm eval`` of all models on the same held-out pairs (its report is written to
  ``OUTPUT/accuracy``), per user and with paired differences to the policy.
- Training cost: each folder's ``trainer_state.json`` (``train_runtime``) over the pairs its steps
  saw (steps x batch x accumulation). The policy's one-time reference pass (pi_SFT's log-probs of the
  training pairs, cached) is not in ``train_runtime``.
- Generation, on ``--prompts-per-user`` held-out prompts of each seen user: the policy, greedy, for the
  user; the sampler (any causal LM: the same for every user) greedy, and ``--best-of`` samples per
  prompt drawn once and shared by every reward model, each picking for the prompt's user; and the
  first sample (no pick). User match: the share of answers nearest to their own user's training
  chosen responses (``prlhf.behaviour``; chance 1 / users). Seconds per answer: generation (and scoring).

Writes ``OUTPUT/report.json`` (``methods``: name -> ``kind``, ``accuracy``, ``accuracy_ci``,
``accuracy_per_user``, ``training``, ``generation``), ``report.md``, ``generations.jsonl`` and
``policy_or_rm.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..behaviour import build_matcher, load_match_groups, user_match_rate
from ..data import load_preference_data
from ..evaluation import held_out_prompts
from ..storage import atomic_write_text


def training_cost(folder: str | Path) -> dict | None:
    """Seconds per training pair of a saved model: ``train_runtime`` of its ``trainer_state.json`` over
    the pairs its optimizer steps saw. None when the folder has no trainer state."""
    folder = Path(folder)
    state_path, args_path = folder / "trainer_state.json", folder / "training_args.json"
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text())
    runtime = next((e["train_runtime"] for e in reversed(state.get("log_history", [])) if "train_runtime" in e), None)
    if runtime is None:
        return None
    args = json.loads(args_path.read_text()) if args_path.is_file() else {}
    per_step = state.get("train_batch_size") or args.get("per_device_train_batch_size")
    per_step = int(per_step) * int(args.get("gradient_accumulation_steps") or 1)
    steps = int(state.get("global_step") or 0)
    pairs = steps * per_step
    return {"train_runtime": float(runtime), "steps": steps, "pairs_per_step": per_step, "pairs": pairs,
            "seconds_per_pair": float(runtime) / pairs if pairs else None}


def _kind(folder: str | Path) -> str:
    from ..reward_model import HEAD_NAME

    if (Path(folder) / HEAD_NAME).is_file():
        cfg = json.loads((Path(folder) / "prlhf_config.json").read_text())
        model = cfg.get("user_model") or "none"
        return "reward model" + ("" if model in ("none", "uniform") else f", user tokens {cfg.get('user_position')}")
    return "policy (implicit reward)"


def run(policy: str, reward_models: list[str], sampler: str, data: str, users: str | None, output: str | Path,
        train_data: str | None = None, prompts_per_user: int = 8, best_of: int = 8, max_new_tokens: int = 48,
        temperature: float = 1.0, batch_size: int = 16, max_length: int | None = None,
        max_prompt_length: int | None = None, seed: int = 0, load_kwargs: dict | None = None, progress=print) -> dict:
    from ..best_of_n import rerank, sample_candidates
    from ..compare import evaluate_reward_models
    from ..config.commands import RMEvalConfig
    from ..modeling import PersonalizedLM
    from ..reward_model import PersonalizedRewardModel

    begin = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    load_kwargs = dict(load_kwargs or {})
    models = [policy, *reward_models]
    names = [Path(m).name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model folders need distinct names, got {names}")

    # 1. accuracy: prlhf rm eval of every model on the same pairs (the policy first: the paired differences' baseline)
    progress(f"accuracy of {len(models)} models on {data}")
    acc_args = RMEvalConfig(model=models, data=[data], users=users, report=str(out / "accuracy"),
                            output=str(out / "accuracy" / "metrics.json"), batch_size=batch_size,
                            **({"max_length": max_length} if max_length else {}),
                            **({"max_prompt_length": max_prompt_length} if max_prompt_length else {}))
    comparison = evaluate_reward_models(acc_args)

    # 2. generation: held-out prompts of each seen user
    records = load_preference_data(data)
    train_path = train_data or (str(Path(users).with_name("train.jsonl")) if users else None)
    if not train_path or not Path(train_path).is_file():
        raise ValueError("the user-match rate needs the training pairs: pass --train-data (or --users beside a train.jsonl)")
    match_groups = load_match_groups(users) if users else {}
    matcher = build_matcher(load_preference_data(train_path), match_groups)
    seen = set(matcher.labels)
    items = [(u, p, t) for u, p, t in held_out_prompts(records, prompts_per_user, seed)
             if u is not None and (match_groups.get(u, u) in seen)]
    if not items:
        raise ValueError(f"{data}: no held-out prompts of users the matcher knows ({sorted(seen)})")
    prompts, user_ids, user_texts = [p for _, p, _ in items], [u for u, _, _ in items], [t for _, _, t in items]
    gen_kwargs = dict(max_new_tokens=max_new_tokens)
    answers: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}

    def greedy(model, name):
        start = time.perf_counter()
        texts = []
        for s in range(0, len(prompts), batch_size):
            texts += model.generate(prompts[s:s + batch_size], user_ids[s:s + batch_size], user_texts[s:s + batch_size],
                                    do_sample=False, **gen_kwargs)
        answers[name], seconds[name] = texts, time.perf_counter() - start

    progress(f"{names[0]}: greedy answers to {len(prompts)} prompts")
    pol = PersonalizedLM.from_pretrained(policy, **load_kwargs)
    greedy(pol, names[0])
    del pol
    progress(f"sampler {sampler}: greedy, and {best_of} samples per prompt")
    sam = PersonalizedLM.from_pretrained_or_plain(sampler, **load_kwargs)
    sampler_name = f"sampler ({Path(sampler).name})"
    greedy(sam, f"{sampler_name}, greedy")
    torch.manual_seed(seed)
    start = time.perf_counter()
    candidates = sample_candidates(sam, prompts, user_ids, user_texts, n=best_of, batch_size=max(1, batch_size // best_of),
                                   max_new_tokens=max_new_tokens, temperature=temperature)
    sample_seconds = time.perf_counter() - start
    del sam
    answers[f"{sampler_name}, first sample"] = [c[0] for c in candidates]
    seconds[f"{sampler_name}, first sample"] = sample_seconds / best_of
    picks: dict[str, list[dict]] = {}
    for path, name in zip(reward_models, names[1:]):
        progress(f"{name}: picks the best of {best_of} for each prompt's user")
        rm = PersonalizedRewardModel.from_pretrained(path, **load_kwargs)
        start = time.perf_counter()
        picks[name] = rerank(rm, prompts, user_ids, candidates, user_texts, batch_size,
                             max_length or 1024, max_prompt_length or 512)
        seconds[name] = sample_seconds + time.perf_counter() - start
        answers[name] = [p["response"] for p in picks[name]]
        del rm

    # 3. the table
    methods: dict[str, dict] = {}
    gens_out = []
    for name, texts in answers.items():
        gens = [{"user_id": u, "response": t} for u, t in zip(user_ids, texts)]
        match = user_match_rate(matcher, gens, match_groups)
        how = ("greedy, for the user" if name == names[0] else f"best of {best_of} sampler answers, picked for the user"
               if name in picks else "greedy, the same for every user" if name.endswith("greedy")
               else "one sample, no pick")
        entry = methods.setdefault(name, {})
        entry["generation"] = {"how": how, "user_match": match["rate"], "user_match_ci": match["ci"],
                               "user_match_per_user": match["per_label"], "n": match["n"],
                               "seconds_per_answer": seconds[name] / len(texts)}
        gens_out += [{"method": name, "user_id": g["user_id"], "prompt": p, "response": g["response"], "matched": g["matched"]}
                     for g, p in zip(gens, prompts)]
    for path, name in zip(models, names):
        m = comparison.methods[name]
        methods[name].update({"folder": str(path), "kind": _kind(path), "accuracy": m["accuracy"],
                              "accuracy_ci": m.get("accuracy_ci"), "accuracy_per_user": comparison.per_user[name],
                              "accuracy_difference": m.get("accuracy_difference"), "training": training_cost(path)})
    for name in methods:
        methods[name].setdefault("kind", "sampler (no user)")
    order = names + [n for n in methods if n not in names]
    report = {"methods": {n: methods[n] for n in order}, "data": data, "users": users, "sampler": sampler,
              "best_of": best_of, "prompts": len(prompts), "prompts_per_user": prompts_per_user,
              "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "user_match_chance": 1.0 / len(matcher.labels),
              "user_match_data": user_match_rate(matcher, [{"user_id": r["user_id"], "response": r["chosen"]}
                                                           for r in records if r.get("user_id") in seen], match_groups)["rate"],
              "runtime_seconds": time.time() - begin}
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in gens_out))
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.md", "# Policy or reward model\n\n" + report_table(report) + "\n")
    plot(report, out / "policy_or_rm.png")
    return report


def _num(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(x, ci) -> str:
    return _num(x) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def report_table(report: dict) -> str:
    """One row per model (and sampler row): accuracy with its interval, per user, training s/pair,
    how answers are made, their user match and seconds per answer."""
    methods = report["methods"]
    users = sorted({u for m in methods.values() for u in (m.get("accuracy_per_user") or {})})
    head = ["model", "kind", "acc seen", *[f"acc {u}" for u in users], "train s/pair", "answers",
            "user match", "s/answer"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        acc = m.get("accuracy") or {}
        per_user = m.get("accuracy_per_user") or {}
        train = m.get("training") or {}
        gen = m.get("generation") or {}
        cells = [name, m.get("kind", "-"), _ci(acc.get("seen"), (m.get("accuracy_ci") or {}).get("seen")) if acc else "-",
                 *[_num(per_user.get(u)) if per_user else "-" for u in users],
                 _num(train.get("seconds_per_pair"), 2), gen.get("how", "-"),
                 _ci(gen.get("user_match"), gen.get("user_match_ci")), _num(gen.get("seconds_per_answer"), 2)]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append(f"\nUser match: chance {_num(report['user_match_chance'])}; the held-out chosen responses themselves "
                f"{_num(report['user_match_data'])}. {report['prompts']} prompts ({report['prompts_per_user']} per user), "
                f"at most {report['max_new_tokens']} new tokens; best of {report['best_of']} samples at temperature "
                f"{report['temperature']}, drawn once and shared by every reward model.")
    return "\n".join(rows)


def plot(report: dict, path: Path) -> Path:
    """Held-out accuracy (seen users) and user match of each row, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    acc = [(report["methods"][n].get("accuracy") or {}).get("seen") for n in names]
    match = [(report["methods"][n].get("generation") or {}).get("user_match") for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [a or 0 for a in acc], width=0.4, label="held-out accuracy (seen)")
    ax.bar([x + 0.2 for x in xs], [m or 0 for m in match], width=0.4, label="user match of answers")
    ax.axhline(report["user_match_chance"], color="gray", linestyle=":", label="user match by chance")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prlhf.experiments.policy_or_rm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="a P-DPO folder (prlhf train)")
    ap.add_argument("--reward-model", action="append", required=True, help="a reward model folder (prlhf rm train); repeat")
    ap.add_argument("--sampler", required=True, help="the LLM whose samples the reward models pick from (any causal LM)")
    ap.add_argument("--data", required=True, help="held-out pairs (test.jsonl)")
    ap.add_argument("--users", default=None, help="users.json of the data (groups)")
    ap.add_argument("--train-data", default=None, help="training pairs for the user-match rate (default: train.jsonl beside --users)")
    ap.add_argument("--prompts-per-user", type=int, default=8)
    ap.add_argument("--best-of", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--max-prompt-length", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True, help="folder for report.json, report.md, generations.jsonl and the plot")
    a = ap.parse_args(argv)
    begin = time.time()
    report = run(a.policy, a.reward_model, a.sampler, a.data, a.users, a.output, a.train_data, a.prompts_per_user, a.best_of,
                 a.max_new_tokens, a.temperature, a.batch_size, a.max_length, a.max_prompt_length, a.seed,
                 progress=lambda s: print(f"[{time.time() - begin:.0f} s] {s}", flush=True))
    print("\n" + report_table(report) + f"\n\nwrote {Path(a.output) / 'report.json'} ({report['runtime_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
