"""Domain-Specific Preference (DSP) data -> one user per domain.

Input: a JSON list of ``{"query": str, "responses": {"academy", "business", "entertainment",
"literature", "normal"}}``. Each domain is a user whose preferred answer is its own domain's
response; ``rejected`` is drawn (seeded) from the other domains' responses and/or ``normal``
(the original Alpaca answer), ``rejected_per_query`` of them per query and user. Queries are
split between train and test; ``unseen_users`` names domains kept out of training. Records are
chat messages by default (``format="text"`` gives plain ``Instruction: ...\nResponse:`` prompts).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..data import DataError, read_records
from .common import Conversion, assign_split, instruction_pair, stable_fraction, where

DOMAINS = ("academy", "business", "entertainment", "literature")
POOLS = ("all", "domains", "normal")


def convert_dsp(input: str, rejected_per_query: int = 1, rejected_pool: str = "all", unseen_users=(),
                test_fraction: float = 0.1, seed: int = 0, format: str = "chat", query_half: int | None = None) -> Conversion:
    """``query_half`` = 1 or 2 keeps one of two disjoint halves of the queries (odd or even
    records: 1st, 3rd, ... or 2nd, 4th, ...), so that settings chosen on one half can be reported
    on the other."""
    if rejected_pool not in POOLS:
        raise ValueError(f"rejected_pool must be one of {POOLS}, got {rejected_pool!r}")
    if rejected_per_query < 1:
        raise ValueError(f"rejected_per_query must be at least 1, got {rejected_per_query}")
    if query_half not in (None, 1, 2):
        raise ValueError(f"query_half must be 1 or 2 (or None: every query), got {query_half!r}")
    unknown = set(unseen_users) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unseen users must be DSP domains {DOMAINS}, got {sorted(unknown)}")
    rows = read_records(Path(input))
    conv = Conversion("dsp", read=len(rows), options=dict(
        rejected_per_query=rejected_per_query, rejected_pool=rejected_pool, unseen_users=sorted(unseen_users),
        test_fraction=test_fraction, seed=seed, format=format, query_half=query_half))
    for d in DOMAINS:
        conv.users[d] = {"seen": d not in unseen_users, "n_pairs": 0, "domain": d}
    for i, row in enumerate(rows):
        w = where(input, i, row)
        if query_half and i % 2 != query_half - 1:
            conv.skip(f"query in the other half (--query-half {query_half})")
            continue
        query, responses = row.get("query"), row.get("responses")
        if not isinstance(query, str):
            raise DataError(f"{w}: field 'query' is missing or not a string")
        if not isinstance(responses, dict):
            raise DataError(f"{w}: field 'responses' is missing or not an object")
        for user in DOMAINS:
            chosen = responses.get(user)
            if not isinstance(chosen, str) or not chosen.strip():
                conv.skip("missing response of the user's domain")
                continue
            pool = [d for d in DOMAINS if d != user] if rejected_pool != "normal" else []
            if rejected_pool != "domains":
                pool.append("normal")
            candidates = []
            for other in pool:
                text = responses.get(other)
                if not isinstance(text, str) or not text.strip():
                    conv.skip("missing rejected candidate")
                elif text.strip() == chosen.strip():
                    conv.skip("rejected candidate identical to chosen")
                else:
                    candidates.append(other)
            if not candidates:
                conv.skip("no rejected candidate left")
                continue
            rng = random.Random(int(stable_fraction(f"{i}:{user}", seed) * 2**32))
            for other in rng.sample(candidates, min(rejected_per_query, len(candidates))):
                rec = {"user_id": user, **instruction_pair(query, chosen, responses[other], format),
                       "user_text": None, "query_index": i, "rejected_domain": other}
                assign_split(conv, rec, query, test_fraction, seed)
    return conv
