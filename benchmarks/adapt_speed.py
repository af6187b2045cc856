"""Seconds per adapted user: few-shot adaptation of new users (``prlhf adapt``) with k labelled pairs.

    python benchmarks/adapt_speed.py --model tiny-llama --json adapt_speed_tiny.json
    python benchmarks/adapt_speed.py --model smollm2-135m-instruct --lora --json adapt_speed_smollm2.json

A personalized model (individual user model, T_u = ``--user-tokens``, offsets at token-embedding
rows; LoRA all-linear r 16 with ``--lora``) is built around ``--model``; its weights are as loaded
(adaptation costs the same whether or not the model was trained first). ``--new-users`` users with
``--k`` pairs each are adapted ``--steps`` Adam steps of ``--batch-size`` pairs, two ways: all
together in one call (their parameters are disjoint, so one batch serves several users) and one
user at a time. Pairs: TL;DR comparisons from ../shared/data/tldr labelled by length (``--data
tldr``, the default when the file is there: posts cut to 120 characters as in the SmolLM2 recipe),
else synthetic length pairs. Prints a table and writes JSON::

    {"seconds_per_user": {"together": float, "one_at_a_time": float}, "reference_seconds_per_user": float,
     "k": int, "steps": int, "new_users": int, "tokens": {"prompt": float, "response": float}, ...}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TLDR = ROOT.parent / "shared" / "data" / "tldr" / "comparisons_batch13.jsonl"


def pairs_for_users(source: str, n_users: int, k: int, seed: int) -> list[dict]:
    """k length-labelled pairs for each of ``n_users`` new users (alternating long / short fans)."""
    if source == "tldr":
        from prlhf.sources.tldr import convert_tldr

        conv = convert_tldr(str(TLDR), label="length", top_k=None, max_prompt_chars=120, test_fraction=0.0, seed=seed)
        pool = conv.train + conv.test + conv.unseen
    else:
        from prlhf.sources.synthetic import synthesize

        conv = synthesize(n_users=2, unseen_users=0, n_prompts=max(40, k * n_users), pairs_per_user=k * n_users,
                          test_fraction=0.0, seed=seed)
        pool = [r for r in conv.train if conv.users[r["user_id"]]["preference"] == "long"]
    records = []
    for u in range(n_users):
        for r in pool[u * k:(u + 1) * k]:
            longer_first = len(str(r["chosen"]).split()) >= len(str(r["rejected"]).split())
            wants_long = u % 2 == 0
            chosen, rejected = (r["chosen"], r["rejected"]) if longer_first == wants_long else (r["rejected"], r["chosen"])
            records.append({"user_id": f"new_{u}", "prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
    if len(records) < n_users * k:
        raise SystemExit(f"not enough pairs for {n_users} users x {k}: {len(records)}")
    return records


def build(model_name: str, user_tokens: int, lora: bool):
    from prlhf.config import PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    config = PersonalizationConfig(model_name, user_model="individual", n_user_tokens=user_tokens,
                                   user_offset_init="vocab", use_lora=lora)
    kw = {"lora_kwargs": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}} if lora else {}
    return PersonalizedLM.build(config, UserRegistry([f"seen_{i}" for i in range(4)]), **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--lora", action="store_true", help="LoRA all-linear r 16 (the reference is the base, adapters off)")
    p.add_argument("--data", choices=("tldr", "synthetic"), default="tldr" if TLDR.is_file() else "synthetic")
    p.add_argument("--new-users", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--user-tokens", type=int, default=4)
    p.add_argument("--max-length", type=int, default=120)
    p.add_argument("--max-prompt-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from prlhf.adapt import adapt_users
    from prlhf.data import tokenize_dataset

    torch.manual_seed(a.seed)
    records = pairs_for_users(a.data, a.new_users, a.k, a.seed)
    model = build(a.model, a.user_tokens, a.lora)
    reference = None
    if not model.is_lora:
        import copy

        reference = copy.deepcopy(model.llm).eval()
    settings = model.tokenize_settings(a.max_length, a.max_prompt_length)
    examples = tokenize_dataset(records, model.tokenizer, settings, model.registry)
    tokens = {"prompt": statistics.fmean(len(e["prompt_ids"]) for e in examples),
              "response": statistics.fmean((len(e["chosen_ids"]) + len(e["rejected_ids"])) / 2 for e in examples)}
    kw = dict(steps=a.steps, batch_size=a.batch_size, learning_rate=1e-2, max_length=a.max_length,
              max_prompt_length=a.max_prompt_length, seed=a.seed)
    t = time.perf_counter()
    together = adapt_users(model, records, reference, **kw)
    together_s = time.perf_counter() - t
    print(f"together: {len(together.adapted_users)} users in {together_s:.1f} s "
          f"(reference pass {together.reference_seconds:.1f} s, training accuracy {together.train_accuracy:.2f})",
          flush=True)
    single_s, single_ref = [], []
    for u in sorted({r["user_id"] for r in records}):
        mine = [r for r in records if r["user_id"] == u]
        t = time.perf_counter()
        res = adapt_users(model, mine, reference, reset=True, **kw)
        single_s.append(time.perf_counter() - t)
        single_ref.append(res.reference_seconds)
        print(f"{u}: {single_s[-1]:.1f} s (reference pass {res.reference_seconds:.1f} s)", flush=True)
    result = {
        "model": a.model, "lora": a.lora, "data": a.data, "k": a.k, "steps": a.steps, "batch_size": a.batch_size,
        "new_users": a.new_users, "user_tokens": a.user_tokens, "tokens": tokens,
        "seconds_per_user": {"together": together_s / a.new_users, "one_at_a_time": statistics.fmean(single_s)},
        "reference_seconds_per_user": statistics.fmean(single_ref),
        "seconds_per_step": {"one_at_a_time": statistics.fmean(s - r for s, r in zip(single_s, single_ref)) / max(a.steps, 1)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
    }
    print("\n| model | k | steps | s per user (together) | s per user (one at a time) | of which reference |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.model}{' LoRA' if a.lora else ''} | {a.k} | {a.steps} | {result['seconds_per_user']['together']:.2f} | "
          f"{result['seconds_per_user']['one_at_a_time']:.2f} | {result['reference_seconds_per_user']:.2f} |")
    if a.json:
        atomic_write_text(a.json, json.dumps({**result, "run": benchmark_record()}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
