"""Evaluation: implicit-reward accuracy of a personalized model on held-out preference pairs.

A pair counts as correct when the implicit reward r(y) = beta * log(pi_P(y|x,u) / pi_SFT(y|x)) of
the chosen response exceeds the rejected one's (beta > 0 does not change the sign, so accuracy
does not depend on it). Groups:

* ``seen``: pairs of users known to the model, each scored with the user's own embedding;
* ``generic``: the same pairs scored with the generic user e_0;
* ``unseen``: pairs of users absent from training, scored with the generic user;
* ``overall``: every pair scored as a deployed model would (own embedding, else generic);
* ``per_user``: ``overall`` per user id (pairs without a user id under ``"<none>"``).
"""

from __future__ import annotations

import torch

from .data import PreferenceCollator, TokenizeSettings, tokenize_dataset
from .losses import sequence_logps
from .modeling import PersonalizedLM
from .users import GENERIC_ROW

NO_USER = "<none>"


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@torch.no_grad()
def pair_margins(model: PersonalizedLM, examples: list[dict], rows: list[int], reference, batch_size: int = 8,
                 ref_cache: dict | None = None) -> list[float]:
    """Implicit reward margin (chosen - rejected, beta = 1) of each tokenized pair for the given user rows.
    ``ref_cache`` (index -> (ref_chosen, ref_rejected)) avoids recomputing reference log-probs."""
    tok = model.tokenizer
    collate = PreferenceCollator(tok.pad_token_id, tok.bos_token_id, model.n_implicit_tokens, "right")
    margins = []
    for s in range(0, len(examples), batch_size):
        chunk = examples[s:s + batch_size]
        batch = {k: v.to(model.device) for k, v in collate(chunk).items()}
        B = len(chunk)
        user_rows = torch.tensor(rows[s:s + batch_size], device=model.device)
        lp = model.sequence_logps(batch, user_rows.repeat(2))
        if ref_cache is not None and all(ex["index"] in ref_cache for ex in chunk):
            ref = torch.tensor([ref_cache[ex["index"]][0] for ex in chunk] + [ref_cache[ex["index"]][1] for ex in chunk],
                               device=model.device)
        else:
            ref = model.reference_logps(batch, reference)
            if ref_cache is not None:
                for i, ex in enumerate(chunk):
                    ref_cache[ex["index"]] = (ref[i].item(), ref[B + i].item())
        margins.extend(((lp[:B] - ref[:B]) - (lp[B:] - ref[B:])).tolist())
    return margins


def evaluate_accuracy(model: PersonalizedLM, records: list[dict], reference=None, batch_size: int = 8,
                      max_length: int | None = 1024, max_prompt_length: int | None = 512) -> dict:
    """Implicit-reward accuracy (the ``metrics.json`` of ``prlhf eval``) plus per-pair results.

    ``reference`` is pi_SFT (a causal LM), or None for a LoRA model (its base, adapters disabled).
    """
    model.eval()
    settings = TokenizeSettings(max_length, max_prompt_length, model.prlhf_config.max_user_text_tokens, model.n_implicit_tokens)
    examples = tokenize_dataset(records, model.tokenizer, settings, model.registry)
    own_rows = [ex["user_row"] for ex in examples]
    ref_cache: dict = {}
    own = pair_margins(model, examples, own_rows, reference, batch_size, ref_cache)
    seen_idx = [i for i, ex in enumerate(examples) if ex["user_id"] in model.registry]
    depends = model.user_model is not None and model.user_model.depends_on_user
    if depends and seen_idx:
        generic_margins = pair_margins(model, [examples[i] for i in seen_idx], [GENERIC_ROW] * len(seen_idx), reference,
                                       batch_size, ref_cache)
    else:  # the generic user's scores equal the users' own
        generic_margins = [own[i] for i in seen_idx]
    correct = [m > 0 for m in own]
    seen_set = set(seen_idx)
    unseen_idx = [i for i, ex in enumerate(examples) if ex["user_id"] is not None and i not in seen_set]
    per_user: dict[str, list[float]] = {}
    for i, ex in enumerate(examples):
        per_user.setdefault(ex["user_id"] if ex["user_id"] is not None else NO_USER, []).append(float(correct[i]))
    pairs = [
        {"index": ex["index"], "user_id": ex["user_id"], "seen": i in seen_set, "margin": own[i], "correct": correct[i]}
        for i, ex in enumerate(examples)
    ]
    for j, i in enumerate(seen_idx):
        pairs[i]["generic_margin"] = generic_margins[j]
    return {
        "n_pairs": len(examples),
        "n_skipped": len(records) - len(examples),
        "accuracy": {
            "overall": _mean([float(c) for c in correct]),
            "seen": _mean([float(correct[i]) for i in seen_idx]),
            "generic": _mean([float(m > 0) for m in generic_margins]),
            "unseen": _mean([float(correct[i]) for i in unseen_idx]),
            "per_user": {u: _mean(v) for u, v in per_user.items()},
        },
        "n": {"seen": len(seen_idx), "unseen": len(unseen_idx)},
        "pairs": pairs,
    }


def load_reference(model: PersonalizedLM, reference: str | None = None, trust_remote_code: bool = False):
    """pi_SFT for a saved model: the given path, else the one recorded at training time; None
    for LoRA models (their base with adapters disabled)."""
    from .models import load_model_and_tokenizer

    path = reference or (None if model.is_lora else model.prlhf_config.reference_model_name_or_path)
    if path is None:
        if model.is_lora:
            return None
        raise ValueError("this model records no reference model: pass --reference PATH (the SFT model)")
    ref, _ = load_model_and_tokenizer(path, trust_remote_code=trust_remote_code)
    return ref.to(model.device).eval()
