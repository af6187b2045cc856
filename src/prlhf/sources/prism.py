"""PRISM (Kirk et al. 2024) -> per-participant preference pairs with the participant's text.

Input: a folder with PRISM's ``survey.jsonl`` (one participant a line: ``user_id``,
``self_description``, ``stated_prefs``, demographics, ...) and ``conversations.jsonl`` (one
conversation a line: ``conversation_id``, ``user_id``, ``conversation_type``,
``conversation_history``: turns with ``turn``, ``role`` ("user" or "model"), ``content``,
``model_name``, ``score``, ``if_chosen``, ``within_turn_id``). The files are read unchanged.

One pair per turn and rejected response: in each turn the participant rated several model
responses and the one with ``if_chosen`` continued the conversation; ``chosen`` is that one,
each other response of the turn is a ``rejected``. The prompt is the conversation so far (earlier
user messages and the chosen responses) as chat messages. ``user_text`` describes the
participant from the survey fields named in ``user_fields``. Participants are split into seen and
unseen with a seeded fraction; seen participants' conversations are split into train and test.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..data import DataError, read_records
from .common import Conversion, assign_split, stable_fraction, where

USER_FIELDS = ("stated_prefs", "self_description", "demographics", "system_string")
# survey_question_mapping.json: "It is important that an AI language model ..."
STATED_PREFS = {
    "values": "reflects my values or cultural perspectives",
    "creativity": "produces responses that are creative and inspiring",
    "fluency": "produces responses that are well-written and coherent",
    "factuality": "produces factual and informative responses",
    "diversity": "summarises multiple viewpoints or different worldviews",
    "safety": "produces responses that are safe and do not risk harm to myself and others",
    "personalisation": "learns from our conversations and feels personalised to me",
    "helpfulness": "produces responses that are helpful and relevant to my requests",
}
DEMOGRAPHICS = ("age", "gender", "employment_status", "education", "marital_status", "english_proficiency",
                "religion", "ethnicity", "reside_country", "birth_country")


def _value(x):
    """Survey answers are strings, or dicts such as ``{"simplified": ..., "categorised": ...}``."""
    if isinstance(x, dict):
        for key in ("simplified", "categorised", "self_described"):
            if isinstance(x.get(key), str) and x[key]:
                return x[key]
        return None
    return x if isinstance(x, (str, int, float)) and str(x).strip() and str(x) != "Prefer not to say" else None


def user_text(survey: dict, fields=("stated_prefs", "self_description", "demographics")) -> str | None:
    """A participant's text from their survey answers (the explicit user model's input)."""
    parts = []
    for f in fields:
        if f == "stated_prefs" and isinstance(survey.get("stated_prefs"), dict):
            prefs = [(k, v) for k, v in survey["stated_prefs"].items() if k in STATED_PREFS and isinstance(v, (int, float))]
            if prefs:
                prefs.sort(key=lambda kv: -kv[1])
                parts.append("It is important to me that an AI language model " + "; ".join(
                    f"{STATED_PREFS[k]} ({v:g}/100)" for k, v in prefs) + ".")
        elif f == "self_description" and _value(survey.get("self_description")):
            parts.append("About me: " + str(survey["self_description"]).strip())
        elif f == "system_string" and _value(survey.get("system_string")):
            parts.append("My instructions for an AI: " + str(survey["system_string"]).strip())
        elif f == "demographics":
            flat = dict(survey)
            if isinstance(survey.get("location"), dict):
                flat.update({k: v for k, v in survey["location"].items() if k not in flat})
            demo = [(k, _value(flat.get(k))) for k in DEMOGRAPHICS]
            demo = [f"{k.replace('_', ' ')}: {v}" for k, v in demo if v is not None]
            if demo:
                parts.append("Demographics: " + "; ".join(demo) + ".")
    return "\n".join(parts) or None


def _role(role: str | None) -> str:
    return "assistant" if role in ("model", "assistant") else role or ""


def conversation_pairs(conv_row: dict, w: str, conv: Conversion) -> list[dict]:
    """The (prompt messages, chosen, rejected) pairs of one conversation, turn by turn."""
    history = conv_row.get("conversation_history")
    if not isinstance(history, list):
        raise DataError(f"{w}: field 'conversation_history' is missing or not a list")
    turns: dict[int, dict] = defaultdict(lambda: {"user": [], "model": []})
    for j, item in enumerate(history):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise DataError(f"{w}: conversation_history[{j}] needs 'role' and 'content'")
        turn = item.get("turn", 0)
        if not isinstance(turn, int):
            raise DataError(f"{w}: conversation_history[{j}].turn must be an integer")
        turns[turn]["user" if item["role"] == "user" else "model"].append(item)
    pairs, messages = [], []
    for t in sorted(turns):
        users, models = turns[t]["user"], turns[t]["model"]
        if not users:
            conv.skip("turn without a user message")
            continue
        messages = messages + [{"role": "user", "content": str(u["content"])} for u in users]
        chosen = [m for m in models if m.get("if_chosen") is True]
        if not chosen:
            conv.skip("turn without a chosen response")
            break  # the conversation continued with an unknown response
        best = max(chosen, key=lambda m: (m.get("score") is not None, m.get("score") or 0))
        for other in models:
            if other is best:
                continue
            if not str(other.get("content", "")).strip() or not str(best.get("content", "")).strip():
                conv.skip("empty response")
            elif str(other["content"]).strip() == str(best["content"]).strip():
                conv.skip("identical responses")
            elif other.get("if_chosen") is True:
                conv.skip("several chosen responses in one turn")
            else:
                pairs.append({
                    "prompt": list(messages),
                    "chosen": [{"role": "assistant", "content": str(best["content"])}],
                    "rejected": [{"role": "assistant", "content": str(other["content"])}],
                    "conversation_id": conv_row.get("conversation_id"),
                    "turn": t,
                    "conversation_type": conv_row.get("conversation_type"),
                    "chosen_model": best.get("model_name"),
                    "rejected_model": other.get("model_name"),
                    "chosen_score": best.get("score"),
                    "rejected_score": other.get("score"),
                })
        messages = messages + [{"role": _role(best.get("role")), "content": str(best["content"])}]
    return pairs


def convert_prism(input: str, unseen_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                  user_fields=("stated_prefs", "self_description", "demographics"), skip_ties: bool = False,
                  max_users: int | None = None) -> Conversion:
    folder = Path(input)
    survey_path, conv_path = folder / "survey.jsonl", folder / "conversations.jsonl"
    for p in (survey_path, conv_path):
        if not p.is_file():
            raise DataError(f"{p}: no such file (prism needs a folder with survey.jsonl and conversations.jsonl)")
    bad = set(user_fields) - set(USER_FIELDS)
    if bad:
        raise ValueError(f"user fields must be among {USER_FIELDS}, got {sorted(bad)}")
    survey = read_records(survey_path)
    conversations = read_records(conv_path)
    result = Conversion("prism", read=len(conversations), options=dict(
        unseen_fraction=unseen_fraction, test_fraction=test_fraction, seed=seed, user_fields=list(user_fields),
        skip_ties=skip_ties, max_users=max_users))
    texts = {}
    for i, row in enumerate(survey):
        uid = row.get("user_id")
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{where(survey_path, i, row)}: field 'user_id' is missing")
        if max_users is not None and len(texts) >= max_users:
            break
        texts[uid] = user_text(row, user_fields)
        result.users[uid] = {"seen": stable_fraction("unseen:" + uid, seed) >= unseen_fraction, "n_pairs": 0,
                             "has_text": texts[uid] is not None}
    for i, row in enumerate(conversations):
        w = where(conv_path, i, row)
        uid = row.get("user_id")
        if not isinstance(uid, str) or not uid:
            raise DataError(f"{w}: field 'user_id' is missing")
        if uid not in result.users:
            result.skip("conversation of a participant not in survey.jsonl" if max_users is None else
                        "conversation of a participant beyond --max-users")
            continue
        for pair in conversation_pairs(row, w, result):
            if skip_ties and pair["chosen_score"] is not None and pair["chosen_score"] == pair["rejected_score"]:
                result.skip("tied scores (--skip-ties)")
                continue
            rec = {"user_id": uid, **pair, "user_text": texts[uid]}
            assign_split(result, rec, str(row.get("conversation_id", i)), test_fraction, seed)
    return result
