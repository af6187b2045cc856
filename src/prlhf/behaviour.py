"""Behavioural metrics that need no LLM judge: user-match rate and user-swap flip rate.

**User-match rate.** Does a generation read like what its user prefers? Each user (or user
group, when ``users.json`` gives groups) is represented by the TF-IDF centroid of its training
*chosen* responses; a generation is assigned to the user whose centroid is nearest (cosine
similarity of l2-normalised TF-IDF vectors, the nearest-centroid classifier), and the rate is the
share of generations assigned to the user (or group) they were generated for. Chance level is
1 / (number of users or groups). On DSP (one user per domain) this is the domain match of a
generation; on the TL;DR length task it is computed over the long / short groups.

**User-swap flip rate.** The share of held-out pairs whose implicit preference (the sign of the
reward margin) changes when the user's embedding is replaced by the generic user's: how much the
model actually uses the user. Zero for a model that cannot tell users apart (vanilla DPO).
"""

from __future__ import annotations

import numpy as np

from .evaluation import read_users
from .stats import bootstrap_ci, pair_score


class NearestCentroidMatcher:
    """TF-IDF nearest-centroid classifier of texts into labels (users or groups)."""

    def __init__(self, texts: list[str], labels: list[str], **tfidf_kwargs):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import normalize

        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.labels = sorted(set(labels))
        if len(self.labels) < 2:
            raise ValueError(f"user matching needs at least 2 users or groups with training responses, got {self.labels}")
        self.vectorizer = TfidfVectorizer(sublinear_tf=True, **tfidf_kwargs).fit(texts)
        X = self.vectorizer.transform(texts)  # (N, V), rows l2-normalised
        y = np.asarray(labels)
        centroids = np.vstack([np.asarray(X[y == lab].mean(axis=0)) for lab in self.labels])  # (L, V)
        self.centroids = normalize(centroids)

    def predict(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        X = self.vectorizer.transform(texts)  # (M, V)
        sims = np.asarray(X @ self.centroids.T)  # (M, L) cosine similarities
        return [self.labels[i] for i in sims.argmax(axis=1)]


def response_text(response) -> str:
    """A response as plain text: the string itself, or the contents of chat messages joined."""
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content") or "") for m in response)


def load_match_groups(users_json) -> dict[str, str]:
    """User id -> group for matching, from a converter's ``users.json``: only when its users carry a
    ``group`` (e.g. majority / minority); empty otherwise, and users are matched one by one."""
    users = read_users(users_json)
    if not any(isinstance(u, dict) and u.get("group") for u in users):
        return {}
    return {str(u["user_id"]): str(u["group"]) for u in users if u.get("group")}


def build_matcher(train_records: list[dict], groups: dict[str, str] | None = None) -> NearestCentroidMatcher:
    """The matcher fit on the training chosen responses of the seen users (labelled by group when
    ``groups`` is given)."""
    texts, labels = [], []
    for rec in train_records:
        label = match_label(rec.get("user_id"), groups or {})
        if label is not None:
            texts.append(response_text(rec["chosen"]))
            labels.append(label)
    return NearestCentroidMatcher(texts, labels)


def match_label(user_id, groups: dict[str, str]) -> str | None:
    """The label a user's generations should match: its group when groups are given, else the user."""
    if user_id is None:
        return None
    return groups.get(user_id, user_id) if groups else user_id


def user_match_rate(matcher: NearestCentroidMatcher, generations: list[dict], groups: dict[str, str] | None = None) -> dict:
    """Share of ``generations`` (dicts with ``user_id`` and ``response``) assigned to their own user
    or group. Generations of users the matcher does not know (unseen users, the generic user)
    are not counted in the rate; their assignments are reported under ``assigned_unknown``."""
    groups = groups or {}
    predicted = matcher.predict([response_text(g["response"]) for g in generations])
    hits: list[float] = []
    by_label: dict[str, list[float]] = {}
    unknown: dict[str, int] = {}
    for g, pred in zip(generations, predicted):
        g["matched"] = pred
        target = match_label(g.get("user_id"), groups)
        if target in matcher.labels:
            hit = float(pred == target)
            hits.append(hit)
            by_label.setdefault(target, []).append(hit)
        else:
            unknown[pred] = unknown.get(pred, 0) + 1
    return {
        "rate": sum(hits) / len(hits) if hits else None,
        "ci": bootstrap_ci(hits),
        "chance": 1.0 / len(matcher.labels),
        "n": len(hits),
        "labels": matcher.labels,
        "per_label": {lab: sum(v) / len(v) for lab, v in sorted(by_label.items())},
        "assigned_unknown": dict(sorted(unknown.items())),
    }


def flip_rate(pairs: list[dict], groups: dict[str, str] | None = None) -> dict:
    """Share of seen pairs (with ``margin`` and ``generic_margin``, as ``evaluate_accuracy`` gives
    them) whose preference flips between the user's own embedding and the generic one; overall,
    per group and with a bootstrap interval."""
    groups = groups or {}
    flips: list[float] = []
    by_group: dict[str, list[float]] = {}
    for p in pairs:
        if "generic_margin" not in p:
            continue
        flip = float(pair_score(p["margin"]) != pair_score(p["generic_margin"]))
        flips.append(flip)
        by_group.setdefault(groups.get(p["user_id"], "seen"), []).append(flip)
    return {
        "rate": sum(flips) / len(flips) if flips else None,
        "ci": bootstrap_ci(flips),
        "n": len(flips),
        "per_group": {g: sum(v) / len(v) for g, v in sorted(by_group.items())},
    }
