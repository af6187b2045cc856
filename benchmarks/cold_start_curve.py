"""Learning curve of new users for any trained model: held-out accuracy after adapting on k pairs.

    python benchmarks/cold_start_curve.py --model outputs/smollm2_tldr/pdpo_individual \\
        --new-users outputs/smollm2_tldr/data/unseen.jsonl --held-out-prompts outputs/smollm2_tldr/data/test.jsonl \\
        --users outputs/smollm2_tldr/data/users.json --ks 0,1,2,4,8 --strategies random --json cold_start_tldr.json

The users of ``--new-users`` must be absent from the model. Their pairs on the prompts of
``--held-out-prompts`` (and, when that leaves a user with too few pairs, a ``--held-out-fraction``
of each user's prompts) are held out; the rest is each user's adaptation pool. For each k and
strategy the new users are adapted from the generic user on the first k pairs of their pool
(``prlhf.experiments.cold_start.learning_curves``); prints the table, writes JSON (the ``cold_start`` shape of
the demo's report plus timing) and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--new-users", required=True, help="pairs of users the model has not seen")
    p.add_argument("--held-out-prompts", default=None, help="a data file whose prompts are held out (e.g. test.jsonl)")
    p.add_argument("--held-out-fraction", type=float, default=0.3,
                   help="without --held-out-prompts: the share of each user's prompts held out")
    p.add_argument("--users", default=None, help="users.json with groups (majority / minority), for per-group numbers")
    p.add_argument("--ks", default="0,1,2,4,8,16,32")
    p.add_argument("--strategies", default="random,active")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-pairs-per-user", type=int, default=None, help="cap each user's held-out pairs")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    from prlhf.adapt import training_objective
    from prlhf.data import load_preference_data
    from prlhf.evaluation import load_user_groups
    from prlhf.experiments.cold_start import learning_curves, pairs_to_match, split_new_users
    from prlhf.modeling import PersonalizedLM
    from prlhf.reference import load_reference
    from prlhf.report import cold_start_table, plot_cold_start

    torch.manual_seed(a.seed)
    start = time.time()
    model = PersonalizedLM.from_pretrained(a.model)
    reference = load_reference(model)
    objective = training_objective(a.model)
    records = load_preference_data(a.new_users)
    known = [r for r in records if r.get("user_id") in model.registry]
    if known:
        raise SystemExit(f"{a.new_users}: {len(known)} pairs belong to users the model already knows")
    if a.held_out_prompts:
        held = {json.dumps(r["prompt"]) for r in load_preference_data(a.held_out_prompts)}
    else:
        prompts = sorted({json.dumps(r["prompt"]) for r in records})
        random.Random(a.seed).shuffle(prompts)
        held = set(prompts[:round(a.held_out_fraction * len(prompts))])
    pools, held_out = split_new_users(records, held)
    if a.max_pairs_per_user:
        count: dict = {}
        kept = []
        for r in held_out:
            count[r["user_id"]] = count.get(r["user_id"], 0) + 1
            if count[r["user_id"]] <= a.max_pairs_per_user:
                kept.append(r)
        held_out = kept
    ks = [int(k) for k in a.ks.split(",")]
    eval_kwargs = {"max_length": a.max_length or objective.get("max_length", 1024),
                   "max_prompt_length": a.max_prompt_length or objective.get("max_prompt_length", 512), "batch_size": 16}
    print(f"{len(pools)} new users, adaptation pools {sorted(len(p) for p in pools.values())}, "
          f"{len(held_out)} held-out pairs", flush=True)
    curves = learning_curves(model, pools, held_out, reference, ks=ks, strategies=a.strategies.split(","),
                             steps=a.steps, learning_rate=a.learning_rate, batch_size=a.batch_size,
                             groups=load_user_groups(a.users), seed=a.seed, objective=objective, eval_kwargs=eval_kwargs,
                             progress=lambda s, k, acc: print(f"{s} k={k}: {acc:.3f} ({time.time() - start:.0f} s)", flush=True))
    name = Path(a.model).name
    cold = {"curves": {name: curves["curves"]}, "ci": {name: curves["ci"]}, "by_group": {name: curves["by_group"]},
            "active_vs_random": {name: pairs_to_match(curves["curves"])}, "seconds": {name: curves["seconds"]},
            "n_users": curves["n_users"], "n_held_out": curves["n_held_out"], "steps": a.steps, "model": a.model,
            "runtime_seconds": time.time() - start}
    print("\n" + cold_start_table(cold))
    out = Path(a.json)
    atomic_write_text(out, json.dumps({**cold, "run": benchmark_record()}, indent=1))
    plot_cold_start(cold, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({cold['runtime_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
