"""Synthetic conflicting preferences: the embedded default data, no download needed.

Prompts ask about a topic; each has a few candidate pairs (``variants_per_prompt``), shared by all
users, whose responses differ in one attribute:

* ``length`` (the paper's TL;DR setting): a short answer (4-7 words) vs a long one (25-40 words);
* ``tone`` (optional): a friendly answer (a warm opening and closing) vs a plain one.

Users prefer one value of each attribute: a share ``majority_share`` of them the majority value
(``long``, ``friendly``), the rest the minority value. ``users.json`` records each user's
``group`` (by the first attribute: ``majority`` / ``minority``) and ``preferences``. A share of
users is unseen (their pairs go to ``unseen.jsonl``); seen users' pairs on held-out prompts go to
``test.jsonl``. Everything is fixed by the seed.
"""

from __future__ import annotations

import random

from .common import Conversion, assign_split

ATTRIBUTES = {"length": ("long", "short"), "tone": ("friendly", "plain")}

TOPICS = ("river", "mountain", "forest", "ocean", "desert", "city", "garden", "library", "market", "castle",
          "island", "village", "bridge", "museum", "school", "farm", "harbor", "valley", "lake", "park",
          "train", "bicycle", "kitchen", "festival", "storm", "winter", "summer", "robot", "violin", "telescope")
ADJECTIVES = ("quiet", "busy", "old", "bright", "cold", "warm", "green", "large", "small", "famous", "calm",
              "beautiful", "strange", "friendly", "ancient", "modern", "wide", "narrow", "peaceful", "lively")
NOUNS = ("people", "children", "birds", "trees", "visitors", "workers", "families", "artists", "animals", "boats")
VERBS = ("visit", "enjoy", "watch", "love", "remember", "explore", "study", "paint", "describe", "protect")
TIMES = ("in the morning", "at night", "in the spring", "every day", "after the rain", "during the holidays")
OPENINGS = ("Happy to help!", "Great question!", "Oh, I love this one!")
CLOSINGS = ("Hope this helps!", "Have a lovely day!", "Enjoy!")


# profile texts (the explicit user model): each user describes their preference in their own words,
# assembled from interchangeable parts plus an unrelated personal detail, so no two users need share
# a text and an unseen user's text is new while its words are not
PROFILE_WORDS = {
    "long": ("long", "detailed", "thorough", "lengthy", "complete", "in-depth"),
    "short": ("short", "brief", "concise", "quick", "compact", "one-line"),
    "friendly": ("warm", "friendly", "cheerful", "kind"),
    "plain": ("plain", "neutral", "matter-of-fact", "dry"),
}
PROFILE_OPENERS = ("I", "Honestly, I", "Personally, I", "As a reader, I", "Most days I")
PROFILE_VERBS = ("like", "prefer", "want", "enjoy", "appreciate", "ask for")
PROFILE_NOUNS = ("answers", "replies", "explanations", "responses")


def profile_text(preferences: dict[str, str], rng: random.Random) -> str:
    """A short self-description consistent with ``preferences`` ({attribute: value}), worded at random."""
    parts = [f"{rng.choice(PROFILE_OPENERS)} {rng.choice(PROFILE_VERBS)} {rng.choice(PROFILE_WORDS[v])} "
             f"{rng.choice(PROFILE_NOUNS)}." for v in preferences.values()]
    detail = f"I live near a {rng.choice(TOPICS)} and I {rng.choice(VERBS)} {rng.choice(NOUNS)} {rng.choice(TIMES)}."
    parts.insert(rng.randint(0, len(parts)), detail)
    return " ".join(parts)


def _short(rng: random.Random, topic: str) -> str:
    return f"The {topic} is {rng.choice(ADJECTIVES)}."


def _long(rng: random.Random, topic: str) -> str:
    sentences = [f"The {topic} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}."]
    while sum(len(s.split()) for s in sentences) < rng.randint(25, 36):
        sentences.append(f"Many {rng.choice(NOUNS)} {rng.choice(VERBS)} the {topic} {rng.choice(TIMES)}, "
                         f"because it is {rng.choice(ADJECTIVES)}.")
    return " ".join(sentences)


def _friendly(rng: random.Random, text: str) -> str:
    return f"{rng.choice(OPENINGS)} {text} {rng.choice(CLOSINGS)}"


def make_candidates(rng: random.Random, topic: str, attribute: str) -> tuple[str, str]:
    """(response with the majority value, response with the minority value) for one attribute."""
    if attribute == "length":
        return _long(rng, topic), _short(rng, topic)
    if attribute == "tone":
        base = _short(rng, topic) if rng.random() < 0.5 else _long(rng, topic)
        return _friendly(rng, base), base
    raise ValueError(f"attributes must be among {sorted(ATTRIBUTES)}, got {attribute!r}")


def synthesize(n_users: int = 20, unseen_users: int = 4, majority_share: float = 0.7, n_prompts: int = 150,
               pairs_per_user: int = 40, attributes=("length",), test_fraction: float = 0.2, seed: int = 0,
               fmt: str = "text", variants_per_prompt: int = 3, user_texts: bool = False,
               unseen_pairs_per_user: int | None = None) -> Conversion:
    """Users with conflicting preferences over shared prompts; see the module docstring.

    ``user_texts``: every record carries a ``user_text``, a self-description consistent with its
    user's preference, worded afresh for every record (a paraphrase: opener, verb, adjective, noun
    and an unrelated personal detail drawn at random), so the text cannot serve as a lookup key for
    the user and a model has to read the preference words; ``users.json`` shows one wording. Drawn
    from separate random streams, so the pairs are the same with and without texts.
    ``unseen_pairs_per_user``: pairs of each unseen user (default ``pairs_per_user``), e.g. more to
    measure how new users are learned from a few of them."""
    for a in attributes:
        if a not in ATTRIBUTES:
            raise ValueError(f"attributes must be among {sorted(ATTRIBUTES)}, got {a!r}")
    if not 0 <= unseen_users < n_users + unseen_users:
        raise ValueError("unseen_users must be >= 0")
    rng = random.Random(seed)
    conv = Conversion("synthetic", options=dict(
        n_users=n_users, unseen_users=unseen_users, majority_share=majority_share, n_prompts=n_prompts,
        pairs_per_user=pairs_per_user, attributes=list(attributes), test_fraction=test_fraction, seed=seed,
        variants_per_prompt=variants_per_prompt, user_texts=user_texts, unseen_pairs_per_user=unseen_pairs_per_user))
    prompts = [f"Tell me about the {TOPICS[i % len(TOPICS)]}" + ("." if i < len(TOPICS) else f" number {i // len(TOPICS) + 1}.")
               for i in range(n_prompts)]
    topic_of = {p: TOPICS[i % len(TOPICS)] for i, p in enumerate(prompts)}
    # candidate pairs per prompt and attribute, shared by all users (so their labels can be compared)
    candidates = {(p, a): [make_candidates(rng, topic_of[p], a) for _ in range(variants_per_prompt)]
                  for p in prompts for a in attributes}
    # one naming scheme for everybody: the ids do not tell who is unseen (users n_users.. are)
    users = [(f"user_{i:03d}", i < n_users) for i in range(n_users + unseen_users)]
    for group_seen in (True, False):  # exact shares within seen and within unseen users
        ids = [u for u, s in users if s == group_seen]
        for a in attributes:
            order = list(ids)
            rng.shuffle(order)
            n_major = round(majority_share * len(order))
            for k, u in enumerate(order):
                info = conv.users.setdefault(u, {"seen": group_seen, "n_pairs": 0, "preferences": {}})
                info["preferences"][a] = ATTRIBUTES[a][0 if k < n_major else 1]
    first = attributes[0]
    for u, info in conv.users.items():
        info["group"] = "majority" if info["preferences"][first] == ATTRIBUTES[first][0] else "minority"
        info["preference"] = info["preferences"][first]
    text_rng = {u: random.Random(f"profile-{seed}-{u}") for u, _ in users} if user_texts else {}
    if user_texts:  # users.json shows one wording of each user's profile
        for u, _ in users:
            conv.users[u]["user_text"] = profile_text(conv.users[u]["preferences"], random.Random(f"profile-{seed}-{u}"))
    for u, seen in users:
        prefs = conv.users[u]["preferences"]
        n_pairs = pairs_per_user if seen or unseen_pairs_per_user is None else unseen_pairs_per_user
        for p in rng.sample(prompts, min(n_pairs, len(prompts))):
            a = rng.choice(list(attributes))
            major, minor = rng.choice(candidates[(p, a)])
            chosen, rejected = (major, minor) if prefs[a] == ATTRIBUTES[a][0] else (minor, major)
            rec = {"user_id": u, "prompt": p + "\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected,
                   "user_text": profile_text(prefs, text_rng[u]) if user_texts else None, "attribute": a}
            if fmt == "chat":
                rec.update(prompt=[{"role": "user", "content": p}], chosen=[{"role": "assistant", "content": chosen}],
                           rejected=[{"role": "assistant", "content": rejected}])
            assign_split(conv, rec, p, test_fraction, seed)
    conv.read = conv.written
    return conv
