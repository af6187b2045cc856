"""Evaluation: implicit-reward accuracy of a personalized model on held-out preference pairs.

A pair counts as correct when the implicit reward r(y) = beta * log(pi_P(y|x,u) / pi_SFT(y|x)) of
the chosen response exceeds the rejected one's (beta > 0 does not change the sign, so accuracy
does not depend on it); an exact tie (e.g. the SFT model scored against itself) counts as half a
pair, a coin flip. Groups:

* ``seen``: pairs of users known to the model, each scored with the user's own embedding;
* ``generic``: the same pairs scored with the generic user e_0;
* ``unseen``: pairs of users absent from training, scored with the generic user;
* ``overall``: every pair scored as a deployed model would (own embedding, else generic);
* ``per_user``: ``overall`` per user id (pairs without a user id under ``"<none>"``).

Each accuracy also comes with a bootstrap confidence interval (``ci``): per-sample means resample
pairs; per-user means (``per_user_mean``: every user weighs the same) resample users.

Generation evaluation (``evaluate_generation``) generates for held-out prompts of each user with
the user's embedding (users absent from training with the generic one) and measures response
lengths per user group (as ``users.json`` records them, e.g. majority / minority / unseen).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import torch

from .config.commands import GENERATE_PROMPTS
from .data import tokenize_dataset
from .modeling import PersonalizedLM
from .reference import memoized_reference, reference_pair_logps
from .scoring import packing_supported
from .stats import bootstrap_ci, mean, pair_score, per_user_mean
from .users import GENERIC_ROW

NO_USER = "<none>"


@torch.no_grad()
def pair_margins(model: PersonalizedLM, examples: list[dict], rows: list[int], reference, batch_size: int = 8,
                 ref_cache: dict | None = None, packing: bool | None = None) -> list[float]:
    """Implicit reward margin (chosen - rejected, beta = 1) of each tokenized pair for the given user rows.
    ``ref_cache`` (index -> (ref_chosen, ref_rejected)) avoids recomputing reference log-probs;
    ``packing`` scores chosen and rejected on one shared prompt (same numbers, less work; default:
    when the model's attention takes a 4D mask)."""
    if packing is None:
        packing = packing_supported(model.llm)
    collate = model.collator(packing=packing)
    margins = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(chunk).items()}
        B = len(chunk)
        user_rows = torch.tensor(rows[s:s + batch_size], device=model.device)
        lp = model.term_logps(batch, [(user_rows, None)])[0]
        if ref_cache is None:
            ref = reference_pair_logps(model, batch, reference)
        else:
            ref = memoized_reference(ref_cache, [ex["index"] for ex in chunk],
                                     lambda: reference_pair_logps(model, batch, reference), model.device)  # noqa: B023
        margins.extend(((lp[:B] - ref[:B]) - (lp[B:] - ref[B:])).tolist())
    return margins


def evaluate_accuracy(model: PersonalizedLM, records: list[dict], reference=None, batch_size: int = 8,
                      max_length: int | None = 1024, max_prompt_length: int | None = 512,
                      ref_cache: dict | None = None) -> dict:
    """Implicit-reward accuracy (the ``metrics.json`` of ``prlhf eval``) plus per-pair results.

    ``reference`` is pi_SFT (a causal LM), or None for a LoRA model (its base, adapters disabled).
    ``ref_cache`` (record index -> reference log-probs) may be shared between models that have the
    same reference and tokenize ``records`` alike (see ``reference_identity``), so the reference
    is scored once.
    """
    model.eval()
    ref_cache = {} if ref_cache is None else ref_cache

    def margins(examples, rows, same_tokens=True):  # the cache is keyed by record index: same tokens only
        return pair_margins(model, examples, rows, reference, batch_size, ref_cache if same_tokens else None)

    return score_pairs(model, records, model.tokenize_settings(max_length, max_prompt_length), margins)


def score_pairs(model, records: list[dict], settings, margins) -> dict:
    """Tokenize ``records`` for ``model`` (a ``PersonalizedLM``, or any object with its
    ``tokenizer``, ``registry``, ``prlhf_config`` and ``user_model``), score each pair with
    ``margins(examples, user_rows, same_tokens)`` (chosen minus rejected, one per example) under
    its own user and, for seen users, under the generic user, and return ``accuracy_metrics``."""
    examples = tokenize_dataset(records, model.tokenizer, settings, model.registry)
    own = margins(examples, [ex["user_row"] for ex in examples])
    seen_idx = [i for i, ex in enumerate(examples) if ex["user_id"] in model.registry]
    if model.prlhf_config.user_id_prompt and seen_idx:
        # the id-in-prompt baseline: the generic user is the prompt with an unknown id
        anonymous = [dict(records[examples[i]["index"]], user_id=None) for i in seen_idx]
        generic_examples = tokenize_dataset(anonymous, model.tokenizer, settings, model.registry)
        generic_margins = margins(generic_examples, [GENERIC_ROW] * len(seen_idx), False)
    elif model.user_model is not None and model.user_model.depends_on_user and seen_idx:
        generic_margins = margins([examples[i] for i in seen_idx], [GENERIC_ROW] * len(seen_idx))
    else:  # the generic user's scores equal the users' own
        generic_margins = [own[i] for i in seen_idx]
    return accuracy_metrics(examples, len(records), seen_idx, own, generic_margins)


def accuracy_metrics(examples: list[dict], n_records: int, seen_idx: list[int], own: list[float],
                     generic_margins: list[float]) -> dict:
    """The ``metrics.json`` accuracies (overall, seen, generic, unseen, per user, with CIs) plus
    per-pair results, from each tokenized pair's margin under its own user (``own``) and, for the
    pairs of seen users (``seen_idx``), under the generic user (``generic_margins``). Any scorer
    whose margin is positive when the chosen response wins fits: implicit rewards, reward models."""
    correct = [pair_score(m) for m in own]
    generic_correct = [pair_score(m) for m in generic_margins]
    seen_set = set(seen_idx)
    unseen_idx = [i for i, ex in enumerate(examples) if ex["user_id"] is not None and i not in seen_set]
    per_user: dict[str, list[float]] = {}
    for i, ex in enumerate(examples):
        per_user.setdefault(ex["user_id"] if ex["user_id"] is not None else NO_USER, []).append(correct[i])
    pairs = [
        {"index": ex["index"], "user_id": ex["user_id"], "seen": i in seen_set, "margin": own[i], "correct": correct[i]}
        for i, ex in enumerate(examples)
    ]
    for j, i in enumerate(seen_idx):
        pairs[i]["generic_margin"] = generic_margins[j]
    samples = {"overall": correct, "seen": [correct[i] for i in seen_idx], "generic": generic_correct,
               "unseen": [correct[i] for i in unseen_idx]}
    users_of = lambda idx: {examples[i]["user_id"] for i in idx} - {None}  # noqa: E731
    seen_users = {u: per_user[u] for u in users_of(seen_idx)}
    unseen_users = {u: per_user[u] for u in users_of(unseen_idx)}
    return {
        "n_pairs": len(examples),
        "n_skipped": n_records - len(examples),
        "accuracy": {
            **{k: mean(v) for k, v in samples.items()},
            "per_user": {u: mean(v) for u, v in per_user.items()},
            "ci": {k: bootstrap_ci(v) for k, v in samples.items()},
            "per_user_mean": {"seen": per_user_mean(seen_users), "unseen": per_user_mean(unseen_users)},
        },
        "n": {"seen": len(seen_idx), "unseen": len(unseen_idx)},
        "pairs": pairs,
    }


# -- generation ----------------------------------------------------------------------------------


def read_users(users_json: str | Path | None) -> list[dict]:
    """The user entries of a converter's ``users.json`` (or of a plain list of them)."""
    if users_json is None:
        return []
    data = json.loads(Path(users_json).read_text())
    return data["users"] if isinstance(data, dict) and "users" in data else data


def load_user_groups(users_json: str | Path | None) -> dict[str, str]:
    """User id -> group from a converter's ``users.json`` (``group``, else ``preference``)."""
    return {str(u["user_id"]): str(u.get("group") or u.get("preference") or "all") for u in read_users(users_json)}


def group_of(user_id: str | None, model: PersonalizedLM, groups: dict[str, str]) -> str:
    """Users absent from training are ``unseen`` (served by the generic user); others their group."""
    if user_id is None or user_id not in model.registry:
        return "unseen"
    return groups.get(user_id, "seen")


def held_out_prompts(records: list[dict], n_per_user: int, seed: int = 0) -> list[tuple[str | None, object, str | None]]:
    """Up to ``n_per_user`` distinct prompts per user: (user_id, prompt, user_text)."""
    by_user: dict = {}
    for rec in records:
        by_user.setdefault(rec.get("user_id"), {}).setdefault(json.dumps(rec["prompt"], sort_keys=True), rec)
    out = []
    rng = random.Random(seed)
    for uid in sorted(by_user, key=lambda u: (u is None, str(u))):
        recs = list(by_user[uid].values())
        rng.shuffle(recs)
        out += [(uid, r["prompt"], r.get("user_text")) for r in recs[:n_per_user]]
    return out


def shared_prompts(records: list[dict], n: int, seed: int = 0) -> list[tuple[str | None, object, str | None]]:
    """The same ``n`` held-out prompts (drawn from every user's) for each user: (user_id, prompt, user_text).
    Group lengths then compare on the same posts, not on each user's own (whose natural lengths differ)."""
    pool: dict = {}
    texts: dict = {}
    for rec in records:
        pool.setdefault(json.dumps(rec["prompt"], sort_keys=True), rec["prompt"])
        texts.setdefault(rec.get("user_id"), rec.get("user_text"))
    keys = sorted(pool)
    random.Random(seed).shuffle(keys)
    prompts = [pool[k] for k in keys[:n]]
    return [(uid, p, texts[uid]) for uid in sorted(texts, key=lambda u: (u is None, str(u))) for p in prompts]


def evaluate_generation(model: PersonalizedLM, records: list[dict], n_per_user: int = 4, groups: dict | None = None,
                        batch_size: int = 8, max_new_tokens: int = 64, seed: int = 0, progress=None,
                        prompts: str = "own", **generate_kwargs) -> dict:
    """Generate for held-out prompts of each user; mean response length (words) per user group.
    ``prompts``: ``own`` (each user's own held-out prompts) or ``shared`` (the same prompts for every user)."""
    if prompts not in GENERATE_PROMPTS:
        raise ValueError(f"prompts must be one of {GENERATE_PROMPTS}, got {prompts!r}")
    groups = groups or {}
    items = (shared_prompts if prompts == "shared" else held_out_prompts)(records, n_per_user, seed)

    # greedy decoding: one text per prompt and served user. Unknown ids share e_0, unless the prompt
    # baseline writes each id into the prompt (user_id_prompt)
    ids_in_prompt = bool(getattr(getattr(model, "prlhf_config", None), "user_id_prompt", None))

    def served(item) -> tuple:
        uid, prompt, text = item
        who = uid if ids_in_prompt or (uid is not None and uid in model.registry) else None
        return json.dumps(prompt, sort_keys=True), who, text

    keys = [served(it) for it in items]
    first: dict = {}
    for key, it in zip(keys, items):
        first.setdefault(key, it)
    todo = list(first.items())  # (key, item): each served user and prompt once
    texts: dict = {}
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        outs = model.generate([p for _, (_, p, _) in chunk], [u for _, (u, _, _) in chunk], [t for _, (_, _, t) in chunk],
                              max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        texts.update({key: out for (key, _), out in zip(chunk, outs)})
        if progress:
            progress(min(s + batch_size, len(todo)), len(todo))
    generations = []
    for key, (uid, prompt, user_text) in zip(keys, items):
        text = texts[key]
        generations.append({"user_id": uid, "group": group_of(uid, model, groups), "prompt": prompt,
                            "response": text, "n_words": len(text.split()),
                            **({"user_text": user_text} if user_text else {})})
    by_group: dict[str, list[int]] = {}
    for g in generations:
        by_group.setdefault(g["group"], []).append(g["n_words"])
    return {
        "length": {k: statistics.fmean(v) for k, v in sorted(by_group.items())},
        "length_ci": {k: bootstrap_ci([float(x) for x in v]) for k, v in sorted(by_group.items())},
        "n_generations": {k: len(v) for k, v in sorted(by_group.items())},
        "prompts": prompts,
        "generations": generations,
    }
