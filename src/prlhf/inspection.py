"""Does this data need personalization? Statistics of a preference file.

The paper's point (Li et al. 2024, Section 3): a user-agnostic model (vanilla RLHF/DPO) can at
best predict the majority label of each comparison. On comparisons labelled by several users,
its accuracy ceiling is the share of labels that agree with the comparison's majority; a
per-user model's ceiling is the share that agree with each user's own majority. A wide gap
between the two is what personalization can win.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter, defaultdict

NO_USER = "<none>"


def _key(x) -> str:
    return x if isinstance(x, str) else json.dumps(x, sort_keys=True, ensure_ascii=False)


def inspect_pairs(records: list[dict]) -> dict:
    """Users, pairs per user, shared prompts, pairwise user agreement and accuracy ceilings."""
    per_user = Counter()
    prompt_users = defaultdict(set)
    labels = defaultdict(lambda: defaultdict(Counter))  # comparison -> user -> winner -> count
    for rec in records:
        user = rec.get("user_id") if rec.get("user_id") is not None else NO_USER
        per_user[user] += 1
        p, c, r = _key(rec["prompt"]), _key(rec["chosen"]), _key(rec["rejected"])
        prompt_users[p].add(user)
        labels[(p, frozenset((c, r)))][user][c] += 1
    counts = sorted(per_user.values())
    shared_prompts = [p for p, us in prompt_users.items() if len(us) > 1]

    # pairwise agreement: users labelling the same comparison, each by their own majority label
    pair_total, pair_same = Counter(), Counter()
    multi = {k: v for k, v in labels.items() if len(v) > 1}
    for by_user in multi.values():
        winner = {u: w.most_common(1)[0][0] for u, w in by_user.items()}
        for u, v in itertools.combinations(sorted(winner), 2):
            pair_total[(u, v)] += 1
            pair_same[(u, v)] += winner[u] == winner[v]
    agreements = [pair_same[k] / pair_total[k] for k in pair_total]

    # accuracy ceilings on comparisons labelled by several users
    n_labels = agnostic = personal = 0
    for by_user in multi.values():
        overall = Counter()
        for w in by_user.values():
            overall.update(w)
            personal += max(w.values())
        n_labels += sum(overall.values())
        agnostic += max(overall.values())
    return {
        "n_pairs": len(records),
        "n_users": len(per_user),
        "pairs_per_user": {"min": counts[0] if counts else 0, "median": float(statistics.median(counts)) if counts else 0.0,
                           "max": counts[-1] if counts else 0},
        "n_prompts": len(prompt_users),
        "prompts_shared_by_several_users": len(shared_prompts),
        "comparisons": len(labels),
        "comparisons_labelled_by_several_users": len(multi),
        "user_agreement": {
            "user_pairs_with_common_comparisons": len(pair_total),
            "common_comparisons": sum(pair_total.values()),
            "mean": statistics.fmean(agreements) if agreements else None,
            "min": min(agreements) if agreements else None,
            "max": max(agreements) if agreements else None,
            "pooled": sum(pair_same.values()) / sum(pair_total.values()) if pair_total else None,
        },
        "ceiling_on_shared_comparisons": {
            "labels": n_labels,
            "user_agnostic": agnostic / n_labels if n_labels else None,
            "per_user": personal / n_labels if n_labels else None,
        },
        "pairs_per_user_detail": dict(per_user.most_common()),
    }


def format_report(stats: dict) -> str:
    f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    ppu, agree, ceil = stats["pairs_per_user"], stats["user_agreement"], stats["ceiling_on_shared_comparisons"]
    rows = [
        ("pairs", stats["n_pairs"]), ("users", stats["n_users"]),
        ("pairs per user (min / median / max)", f"{ppu['min']} / {f(ppu['median'])} / {ppu['max']}"),
        ("prompts", stats["n_prompts"]), ("prompts shared by several users", stats["prompts_shared_by_several_users"]),
        ("comparisons labelled by several users", stats["comparisons_labelled_by_several_users"]),
        ("user pairs with common comparisons", agree["user_pairs_with_common_comparisons"]),
        ("agreement between users (pooled / mean / min / max)",
         f"{f(agree['pooled'])} / {f(agree['mean'])} / {f(agree['min'])} / {f(agree['max'])}"),
        ("accuracy ceiling, user-agnostic model (vanilla DPO)", f(ceil["user_agnostic"])),
        ("accuracy ceiling, per-user model", f(ceil["per_user"])),
    ]
    lines = ["| statistic | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if ceil["user_agnostic"] is not None and ceil["per_user"] is not None:
        gap = ceil["per_user"] - ceil["user_agnostic"]
        lines.append("")
        lines.append(f"On comparisons labelled by several users, a per-user model can be right {gap:.1%} more often "
                     "than any user-agnostic one" + (" - this data needs personalization." if gap > 0.05 else "."))
    return "\n".join(lines)
