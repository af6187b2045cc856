"""Cold start, measured: how fast a trained model learns users it has never seen.

``learning_curves`` adapts the new users of a data set (``prlhf.adapt.adapt_users``) from k of
their labelled pairs, k = 0 (the generic user), 1, 2, 4, ..., chosen at random or by active
questions (``prlhf.adapt.suggest_pairs``), and scores each user's held-out pairs after each
adaptation. The k pairs of a user are nested (the first k of one fixed order per strategy), and
every adaptation restarts the users from the generic user, so the points of a curve differ only
in k. ``cold_start_table`` and ``plot_cold_start`` present the result; the demo and
``benchmarks/adapt_speed.py`` use them.
"""

from __future__ import annotations

import json
import random

from ..adapt import adapt_users, suggest_pairs
from ..evaluation import evaluate_accuracy, evaluate_generation
from ..stats import bootstrap_ci

DEFAULT_KS = (0, 1, 2, 4, 8, 16, 32)


def split_new_users(records: list[dict], held_out_prompts: set[str]) -> tuple[dict[str, list[dict]], list[dict]]:
    """Each new user's adaptation pool (pairs on other prompts) and all held-out pairs (pairs on
    ``held_out_prompts``, the prompts no adaptation sees)."""
    pools: dict[str, list[dict]] = {}
    held_out = []
    for r in records:
        if json.dumps(r["prompt"]) in held_out_prompts:
            held_out.append(r)
        else:
            pools.setdefault(str(r["user_id"]), []).append(r)
    return pools, held_out


def accuracy_by_group(pairs: list[dict], groups: dict[str, str] | None) -> dict[str, float]:
    """Mean correctness of ``evaluate_accuracy``'s per-pair results per user group (``all`` when
    a user has none)."""
    hits: dict[str, list[float]] = {}
    for p in pairs:
        hits.setdefault((groups or {}).get(str(p["user_id"]), "all"), []).append(p["correct"])
    return {g: sum(v) / len(v) for g, v in sorted(hits.items())}


def hits_in_order(acc: dict, n: int) -> list[float]:
    """Per-pair correctness of ``evaluate_accuracy``'s result in the scored records' order (pairs are
    matched by record index), so that hits of several models or k line up pair by pair."""
    by_index = {p["index"]: p["correct"] for p in acc["pairs"]}
    return [by_index[i] for i in range(n)]


def ordered_pools(pools: dict[str, list[dict]], seed: int) -> dict[str, list[dict]]:
    """Each user's pool in the random choice's fixed order (its first k pairs are the k-pair sample)."""
    out = {}
    for uid, pool in sorted(pools.items()):
        order = list(range(len(pool)))
        random.Random(f"{seed}-{uid}").shuffle(order)
        out[uid] = [pool[i] for i in order]
    return out


def _orders(model, pools: dict[str, list[dict]], reference, strategies, seed: int, score_kwargs: dict) -> dict:
    orders = {}
    for strategy in strategies:
        if strategy == "random":
            orders[strategy] = ordered_pools(pools, seed)
            continue
        orders[strategy] = {}
        for uid, pool in sorted(pools.items()):
            order = suggest_pairs(model, pool, len(pool), reference, "active", seed=seed, **score_kwargs)
            orders[strategy][uid] = [pool[i] for i in order]
    return orders


def learning_curves(model, pools: dict[str, list[dict]], held_out: list[dict], reference=None, ks=DEFAULT_KS,
                    strategies=("random", "active"), steps: int = 30, learning_rate: float | None = None,
                    batch_size: int = 16, groups: dict[str, str] | None = None, seed: int = 0,
                    objective: dict | None = None, eval_kwargs: dict | None = None, generate_at: int | None = None,
                    generate_per_user: int = 4, max_new_tokens: int = 60, score_kwargs: dict | None = None,
                    progress=None) -> dict:
    """Held-out accuracy of the new users after adapting on k of their pairs, per strategy.

    Returns ``{"curves": {strategy: {str(k): accuracy}}, "ci": {...}, "by_group": {strategy: {str(k):
    {group: acc}}}, "hits": {strategy: {str(k): per-pair correctness in held_out's order}}, "pairs_used": {...}, "seconds": {...}, "words": {group: mean words}}`` (words:
    greedy generations for the new users after the random choice's k = ``generate_at``).
    ``model`` is changed in place: the new users are added to it."""
    eval_kwargs = dict(eval_kwargs or {})
    score_kwargs = dict(score_kwargs or {})
    orders = _orders(model, pools, reference, strategies, seed, score_kwargs)
    eval_cache: dict = {}
    adapt_cache: dict = {}
    out = {"curves": {}, "ci": {}, "by_group": {}, "hits": {}, "pairs_used": {}, "seconds": {}, "n_users": len(pools),
           "n_held_out": len(held_out), "steps": steps}

    def score() -> tuple[float, list[float], dict, list[float]]:
        acc = evaluate_accuracy(model, held_out, reference, ref_cache=eval_cache, **eval_kwargs)
        hits = hits_in_order(acc, len(held_out))
        return acc["accuracy"]["overall"], bootstrap_ci(hits), accuracy_by_group(acc["pairs"], groups), hits

    generic = None
    for strategy in strategies:
        curve, cis, by_group, hits, used, seconds = {}, {}, {}, {}, {}, {}
        for k in ks:
            if k == 0:  # the generic user: evaluated before any new user exists in the model
                if generic is None:
                    generic = score()
                curve["0"], cis["0"], by_group["0"], hits["0"] = generic
                used["0"], seconds["0"] = 0, 0.0
                continue
            records = [r for uid in sorted(orders[strategy]) for r in orders[strategy][uid][:k]]
            result = adapt_users(model, records, reference, steps=steps, learning_rate=learning_rate,
                                 batch_size=batch_size, reset=True, seed=seed, objective=objective, ref_cache=adapt_cache,
                                 max_length=eval_kwargs.get("max_length"), max_prompt_length=eval_kwargs.get("max_prompt_length"))
            curve[str(k)], cis[str(k)], by_group[str(k)], hits[str(k)] = score()
            used[str(k)], seconds[str(k)] = len(records), result.seconds
            if progress:
                progress(strategy, k, curve[str(k)])
            if strategy == "random" and generate_at == k:
                gen = evaluate_generation(model, held_out, n_per_user=generate_per_user, groups=groups,
                                          max_new_tokens=max_new_tokens)
                out["words"] = gen["length"]
                out["words_at"] = k
        out["curves"][strategy], out["ci"][strategy], out["by_group"][strategy] = curve, cis, by_group
        out["hits"][strategy] = hits
        out["pairs_used"][strategy], out["seconds"][strategy] = used, seconds
    return out


def pairs_to_match(curves: dict, target_k: int = 8) -> dict:
    """For each curve of a model: the smallest k at which the active choice reaches the random
    choice's accuracy at ``target_k`` (None when it never does)."""
    rand, act = curves.get("random", {}), curves.get("active", {})
    goal = rand.get(str(target_k))
    if goal is None or not act:
        return {"random_at_k": goal, "active_k_needed": None}
    reached = [int(k) for k, v in act.items() if v is not None and v >= goal]
    return {"random_at_k": goal, "active_k_needed": min(reached) if reached else None}
