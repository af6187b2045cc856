"""Statistics of held-out results: a pair's score, means, percentile bootstrap intervals (per
sample, per user) and paired differences between two models on the same pairs."""

from __future__ import annotations

import numpy as np


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def pair_score(margin: float) -> float:
    """1 when the chosen response wins, 0 when it loses, 0.5 on an exact tie."""
    return 1.0 if margin > 0 else 0.0 if margin < 0 else 0.5


def bootstrap_ci(values: list[float], n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (numpy, resamples drawn in chunks
    so that memory stays bounded for long lists)."""
    if not values:
        return None
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, 4_000_000 // n))
    means = np.concatenate([x[rng.integers(0, n, size=(min(chunk, n_boot - s), n))].mean(axis=1)
                            for s in range(0, n_boot, chunk)])
    means.sort()
    lo = means[int((1 - level) / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return [float(lo), float(hi)]


def paired_difference(pairs: list[dict], baseline_pairs: list[dict], group: str = "seen", n_boot: int = 1000,
                      level: float = 0.95, seed: int = 0) -> dict | None:
    """Accuracy of one model minus a baseline's on the same held-out pairs (matched by record
    index; ``group`` "seen" or "unseen"), with a paired bootstrap interval: pairs are resampled
    together, so the variation the two models share cancels."""
    want = group == "seen"
    base = {p["index"]: p["correct"] for p in baseline_pairs if p["seen"] == want}
    diffs = [p["correct"] - base[p["index"]] for p in pairs if p["seen"] == want and p["index"] in base]
    if not diffs:
        return None
    return {"mean": sum(diffs) / len(diffs), "ci": bootstrap_ci(diffs, n_boot, level, seed), "n": len(diffs)}


def per_user_mean(groups: dict[str, list[float]], n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """The mean over users of each user's mean, with an interval from resampling users."""
    user_means = [sum(v) / len(v) for v in groups.values() if v]
    return {"mean": mean(user_means), "ci": bootstrap_ci(user_means, n_boot, level, seed), "n_users": len(user_means)}
