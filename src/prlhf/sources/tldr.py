"""Reddit TL;DR comparisons (OpenAI summarize_from_feedback) -> per-worker preference pairs.

Input: one JSON object a line (``info.post/title/subreddit`` or ``info.article/site``,
``summaries[2].text/policy``, ``choice``, ``worker``), or the hub data set
``openai/summarize_from_feedback`` (config ``comparisons``) when reachable.

Labels:
* ``human``: the worker's own ``choice``;
* ``length``: the paper's conflicting-preference task (Li et al. 2024, Section 5.1). Workers are
  assigned "prefers longer" or "prefers shorter" with a seed: within the seen users, and again
  within the unseen users, a seeded shuffle gives round(long_share * n) of them "long" (so each
  group has the stated share); ``chosen`` is then the longer (or shorter) summary, and pairs of
  equal length (in words, or characters) are skipped and counted.

The ``top_k`` most frequent workers are the seen users (ties broken by id); the others are
unseen. Held-out pairs of seen users (``test``) are chosen by post, so no test post is trained on.

``worker_half`` = 1 or 2 keeps one of two disjoint halves of the file's workers
(``worker_halves``), so that settings chosen on one half can be reported on the other.

``pool_users`` = N (``--label length`` only) merges the seen workers into N pooled users
(``long_1``, ..., ``short_1``, ...): round(long_share * N) pools prefer longer summaries, the
rest shorter, and each worker joins the pool of its preference that holds the fewest pairs so
far (largest workers first). Since the length labels are synthetic, a pooled user is a user
like any other, with more pairs: batch 13 gives its top-10 workers about 57 pairs each, the
paper's workers have thousands. ``users.json`` lists each pool's member workers; unseen
workers stay as they are.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from ..data import DataError, read_records
from .common import Conversion, assign_split, load_hub_dataset, where

HUB_NAME = "openai/summarize_from_feedback"


def tldr_prompt(info: dict, max_prompt_chars: int | None = None) -> str:
    """The paper's prompt: ``SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:``
    (CNN/DM articles: ``TITLE: {title}\\nARTICLE: {article}\\nTL;DR:``); the post is cut at a
    word boundary to ``max_prompt_chars``."""
    body = info.get("post") if info.get("post") is not None else info.get("article")
    body = (body or "").strip()
    if max_prompt_chars is not None and len(body) > max_prompt_chars:
        cut = body[:max_prompt_chars]
        body = cut[: cut.rfind(" ")] if " " in cut else cut
    if info.get("post") is not None:
        return f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\nPOST: {body}\nTL;DR:"
    return f"TITLE: {info.get('title', '')}\nARTICLE: {body}\nTL;DR:"


def _length(text: str, unit: str) -> int:
    return len(text.split()) if unit == "words" else len(text.strip())


def _check(row: dict, w: str, label: str) -> None:
    info = row.get("info")
    if not isinstance(info, dict):
        raise DataError(f"{w}: field 'info' is missing or not an object")
    if not isinstance(info.get("post"), str) and not isinstance(info.get("article"), str):
        raise DataError(f"{w}: field 'info.post' (or 'info.article') is missing")
    summaries = row.get("summaries")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError(f"{w}: field 'summaries' must be a list of 2 summaries")
    for j, s in enumerate(summaries):
        if not isinstance(s, dict) or not isinstance(s.get("text"), str):
            raise DataError(f"{w}: field 'summaries[{j}].text' is missing")
    if not isinstance(row.get("worker"), str) or not row["worker"]:
        raise DataError(f"{w}: field 'worker' is missing")
    if label == "human" and row.get("choice") not in (0, 1):
        raise DataError(f"{w}: field 'choice' must be 0 or 1, got {row.get('choice')!r}")


def worker_halves(rows: list[dict]) -> tuple[set[str], set[str]]:
    """Two disjoint halves of the file's workers, alike in size: workers ranked by their number of
    comparisons (ties by id) go alternately to half 1 (ranks 1, 3, 5, ...) and half 2 (2, 4, ...).
    Settings chosen on one half are then reported on the other, whose users were never looked at."""
    counts = Counter(r["worker"] for r in rows)
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    return set(ranked[0::2]), set(ranked[1::2])


def _is_supervised(policy) -> bool:
    return isinstance(policy, str) and "sup" in policy and "ppo" not in policy


def convert_tldr(input: str, label: str = "human", long_share: float = 0.7, top_k: int | None = 10,
                 sft_only: bool = False, max_prompt_chars: int | None = None, test_fraction: float = 0.1,
                 seed: int = 0, length_unit: str = "words", hub_split: str = "validation",
                 pool_users: int | None = None, worker_half: int | None = None) -> Conversion:
    if label not in ("human", "length"):
        raise ValueError(f"label must be 'human' or 'length', got {label!r}")
    if pool_users is not None and (label != "length" or pool_users < 1):
        raise ValueError(f"pool_users needs label='length' and a positive number of pools, got {pool_users!r} "
                         f"with label={label!r}")
    if length_unit not in ("words", "chars"):
        raise ValueError(f"length_unit must be 'words' or 'chars', got {length_unit!r}")
    if worker_half not in (None, 1, 2):
        raise ValueError(f"worker_half must be 1 or 2 (or None: every worker), got {worker_half!r}")
    path = Path(input)
    rows = read_records(path) if path.exists() else load_hub_dataset(input, "comparisons", hub_split)
    conv = Conversion("tldr", read=len(rows), options=dict(
        label=label, long_share=long_share, top_k=top_k, sft_only=sft_only, max_prompt_chars=max_prompt_chars,
        test_fraction=test_fraction, seed=seed, length_unit=length_unit, pool_users=pool_users,
        worker_half=worker_half))

    for i, row in enumerate(rows):
        _check(row, where(input, i, row), label)
    half = worker_halves(rows)[worker_half - 1] if worker_half else None
    kept = []
    for row in rows:
        if half is not None and row["worker"] not in half:
            conv.skip(f"worker in the other half (--worker-half {worker_half})")
            continue
        a, b = row["summaries"]
        if sft_only and not (_is_supervised(a.get("policy")) and _is_supervised(b.get("policy"))):
            conv.skip("not both supervised policies (--sft-only)")
            continue
        if not a["text"].strip() or not b["text"].strip():
            conv.skip("empty summary")
            continue
        if a["text"].strip() == b["text"].strip():
            conv.skip("identical summaries")
            continue
        if label == "length" and _length(a["text"], length_unit) == _length(b["text"], length_unit):
            conv.skip(f"equal-length summaries ({length_unit})")
            continue
        kept.append(row)

    counts = Counter(r["worker"] for r in kept)
    ranked = sorted(counts, key=lambda u: (-counts[u], u))
    seen = set(ranked if not top_k else ranked[:top_k])
    for u in ranked:
        conv.users[u] = {"seen": u in seen, "n_pairs": 0}
    if label == "length":
        majority = "long" if long_share >= 0.5 else "short"
        for group in (sorted(seen), sorted(set(ranked) - seen)):
            order = list(group)
            random.Random(seed).shuffle(order)
            n_long = round(long_share * len(order))
            for k, u in enumerate(order):
                pref = "long" if k < n_long else "short"
                conv.users[u].update(preference=pref, group="majority" if pref == majority else "minority")

    pool_of = _pool_workers(conv, counts, seen, long_share, pool_users) if pool_users else {}

    for row in kept:
        a, b = row["summaries"]
        user = pool_of.get(row["worker"], row["worker"])
        if label == "human":
            win = row["choice"]
        else:
            longer = 0 if _length(a["text"], length_unit) > _length(b["text"], length_unit) else 1
            win = longer if conv.users[user]["preference"] == "long" else 1 - longer
        chosen, rejected = row["summaries"][win], row["summaries"][1 - win]
        rec = {
            "user_id": user,
            "prompt": tldr_prompt(row["info"], max_prompt_chars),
            "chosen": chosen["text"],
            "rejected": rejected["text"],
            "user_text": None,
            "post_id": row["info"].get("id"),
            "policies": [chosen.get("policy"), rejected.get("policy")],
            "worker": row["worker"],
            "worker_choice_agrees": (win == row.get("choice")) if row.get("choice") in (0, 1) else None,
        }
        assign_split(conv, rec, str(row["info"].get("id") or rec["prompt"]), test_fraction, seed)
    return conv


def _pool_workers(conv: Conversion, counts: Counter, seen: set[str], long_share: float, n_pools: int) -> dict[str, str]:
    """Merge the seen workers into ``n_pools`` pooled users of their own preference; returns worker -> pool
    and replaces the seen workers' entries of ``conv.users`` by the pools'."""
    majority = "long" if long_share >= 0.5 else "short"
    n_long = round(long_share * n_pools)
    sizes = {"long": n_long, "short": n_pools - n_long}
    workers = {p: sorted((u for u in seen if conv.users[u]["preference"] == p), key=lambda u: (-counts[u], u))
               for p in sizes}
    for pref, n in sizes.items():
        if n and not workers[pref]:
            raise ValueError(f"pool_users={n_pools}: {n} pooled user(s) prefer {pref} summaries but no seen worker "
                             f"does; raise top_k or change long_share")
        if workers[pref] and not n:
            raise ValueError(f"pool_users={n_pools} leaves no pool for the {len(workers[pref])} seen worker(s) who "
                             f"prefer {pref} summaries; raise pool_users")
    pool_of: dict[str, str] = {}
    others = {u: info for u, info in conv.users.items() if u not in seen}
    conv.users.clear()  # pooled users first, then the unseen workers
    for pref, n in sizes.items():
        pools = [f"{pref}_{k + 1}" for k in range(n)]
        load = dict.fromkeys(pools, 0)
        for u in workers[pref]:
            target = min(pools, key=lambda p: (load[p], p))
            load[target] += counts[u]
            pool_of[u] = target
        for p in pools:
            members = [u for u in workers[pref] if pool_of[u] == p]
            conv.users[p] = {"seen": True, "n_pairs": 0, "preference": pref,
                             "group": "majority" if pref == majority else "minority", "workers": members}
    conv.users.update(others)
    return pool_of
