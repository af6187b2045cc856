"""Preference data: the canonical record, its validation and tokenization.

A record (one JSON object per line, or a row of any ``datasets`` dataset)::

    {"user_id": str | null, "prompt": str | [messages], "chosen": str | [messages],
     "rejected": str | [messages], "user_text": str | null, ...metadata}

``user_id`` null (or an id unknown to the model) means the generic user. Messages are
``{"role": ..., "content": ...}`` dicts and go through the tokenizer's chat template; plain
strings are concatenated (``prompt + chosen + eos``), as TRL does. Extra fields are kept.

A tokenized pair holds ``prompt_ids`` (with BOS when the tokenizer adds one), ``chosen_ids``,
``rejected_ids``, ``user_text_ids`` and ``user_row``; ``prlhf.layout`` places the user tokens in
the sequence and ``prlhf.collate`` batches the pairs.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .user_models import encode_user_text

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data; the message names the file, the record (0-based line/row) and the field."""


# ---------------------------------------------------------------------------------------------
# Reading and validating records


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a file: a JSON list, or one object per line (JSONL). Objects read from
    JSONL carry their line number as ``_line``; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte {raw[err.start]:#04x} at offset {err.start}); "
                        "save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}: record {i}: expected an object, got {type(row).__name__}")
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        row["_line"] = lineno
        rows.append(row)
    return rows


def read_prompt_records(path: str | Path) -> list[dict]:
    """Rows to generate for (``prlhf generate --input``): each with a ``prompt`` (text or chat
    messages), optional ``user_id`` and ``user_text``; errors name the file, record and field."""
    records = read_records(path)
    for i, rec in enumerate(records):
        if not isinstance(rec.get("prompt"), (str, list)):
            raise DataError(f"{path}: record {i} (line {rec.get('_line')}): field 'prompt' is missing")
        rec.pop("_line", None)
    return records


def read_scoring_rows(path: str | Path) -> list[dict]:
    """Rows to score with a reward model (``prlhf rm score``): ``prompt`` (text or chat messages),
    ``response`` (text), optional ``user_id`` and ``user_text``; errors name the file, record and field."""
    rows = read_records(path)
    for i, row in enumerate(rows):
        where = f"{path}: record {i}" + (f" (line {row['_line']})" if "_line" in row else "")
        if not isinstance(row.get("prompt"), (str, list)):
            raise DataError(f"{where}: field 'prompt' is missing or not text / chat messages")
        if not isinstance(row.get("response"), str):
            raise DataError(f"{where}: field 'response' is missing or not text")
        for key in ("user_id", "user_text"):
            if row.get(key) is not None and not isinstance(row[key], (str, int)):
                raise DataError(f"{where}: field {key!r} must be text, got {type(row[key]).__name__}")
        row.pop("_line", None)
    return rows


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def validate_record(rec: dict, where: str) -> dict:
    """Check one record's fields and normalise ``user_id`` to ``str | None``; raise ``DataError``."""
    for field in REQUIRED_FIELDS:
        if field not in rec or rec[field] is None:
            raise DataError(f"{where}: field '{field}' is missing")
        value = rec[field]
        if isinstance(value, str):
            if field != "prompt" and not value.strip():
                raise DataError(f"{where}: field '{field}' is empty")
        elif _is_messages(value):
            for j, m in enumerate(value):
                if "role" not in m or "content" not in m:
                    raise DataError(f"{where}: field '{field}': message {j} needs 'role' and 'content'")
                if not isinstance(m["role"], str) or not m["role"]:
                    raise DataError(f"{where}: field '{field}': message {j}: 'role' must be a non-empty string, "
                                    f"got {m['role']!r}")
                if not isinstance(m["content"], str):
                    raise DataError(f"{where}: field '{field}': message {j}: 'content' must be a string, "
                                    f"got {type(m['content']).__name__}")
            if field != "prompt" and not value:
                raise DataError(f"{where}: field '{field}' is an empty message list")
        else:
            raise DataError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")
    conversational = [_is_messages(rec[f]) for f in REQUIRED_FIELDS]
    if any(conversational) and not all(conversational):
        raise DataError(f"{where}: fields 'prompt', 'chosen', 'rejected' must all be strings or all be message lists")
    if rec["chosen"] == rec["rejected"]:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    out = dict(rec)
    uid = rec.get("user_id")
    if uid is not None and (not isinstance(uid, (str, int)) or isinstance(uid, bool)):
        raise DataError(f"{where}: field 'user_id' must be a string, an integer or null, got {type(uid).__name__}")
    out["user_id"] = None if uid is None or str(uid) == "" else str(uid)
    text = rec.get("user_text")
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field 'user_text' must be a string or null, got {type(text).__name__}")
    out["user_text"] = text or None
    return out


def load_preference_data(source: str | Path | Iterable[dict]) -> list[dict]:
    """Records from a JSONL file, a JSON list file, a ``datasets`` dataset or a list of dicts.

    Every record is validated; the first bad one raises ``DataError`` naming file, record and field.
    """
    if isinstance(source, (str, Path)):
        records, name = read_records(source), str(source)
    else:
        records, name = [dict(r) for r in source], "data"
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{name}: record {i}: expected an object, got {type(rec).__name__}")
        line = rec.pop("_line", None)
        where = f"{name}: record {i}" + (f" (line {line})" if line else "")
        out.append(validate_record(rec, where))
    if not out:
        raise DataError(f"{name}: no records")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenization


def hold_out_pairs(records: list[dict], n: int, seed: int = 0, max_share: float = 0.25) -> tuple[list[dict], list[dict]]:
    """(kept, held out): ``n`` pairs of named users held out of ``records`` for the training-time
    health signal, spread over the users (round-robin, a seeded draw within each user), at most
    ``max_share`` of any user's pairs so that every user keeps most of its data. Pairs without a
    user id are never held out. The order of the kept records is unchanged."""
    rng = random.Random(seed)
    by_user: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        if rec.get("user_id") not in (None, ""):
            by_user.setdefault(str(rec["user_id"]), []).append(i)
    queues = {}
    for user in sorted(by_user):
        idx = by_user[user][:]
        rng.shuffle(idx)
        queues[user] = idx[: int(len(idx) * max_share)]
    held: list[int] = []
    while len(held) < n and any(queues.values()):
        for user in sorted(queues):
            if queues[user] and len(held) < n:
                held.append(queues[user].pop())
    chosen = set(held)
    return [r for i, r in enumerate(records) if i not in chosen], [records[i] for i in sorted(chosen)]


def cap_pairs_per_user(records: list[dict], n: int | None) -> list[dict]:
    """The first ``n`` pairs of each user, in file order (all of them when ``n`` is None)."""
    if n is None:
        return records
    seen: dict = {}
    kept = []
    for r in records:
        seen[r["user_id"]] = seen.get(r["user_id"], 0) + 1
        if seen[r["user_id"]] <= n:
            kept.append(r)
    return kept


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Prompt ids as the model sees them at generation time (chat template with generation prompt)."""
    if _is_messages(prompt):
        return _chat_ids(tokenizer, prompt, add_generation_prompt=True)
    return tokenizer(prompt)["input_ids"]


def tokenize_response(tokenizer, prompt, response) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids): the response starts where tokenized prompt and prompt+response
    diverge (tokens may merge across the boundary); plain-text responses get EOS appended."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    if _is_messages(prompt):
        full = _chat_ids(tokenizer, list(prompt) + list(response), add_generation_prompt=False)
    else:
        eos = tokenizer.eos_token or ""
        full = tokenizer(prompt + (response if response.endswith(eos) else response + eos))["input_ids"]
    n = _common_prefix(prompt_ids, full)
    return prompt_ids[:n], full[n:]


@dataclass
class TokenizeSettings:
    max_length: int | None = 1024  # prompt + response; the user prefix (implicit vectors, user text) comes on top
    max_prompt_length: int | None = 512  # prompt tokens (BOS included); longer prompts keep their end
    max_user_text_tokens: int = 128
    n_user_tokens: int = 0  # implicit slots (0 when there is no implicit user model)
    user_id_prompt: str | None = None  # baseline: the user id written into the prompt with this template


def with_user_id(prompt: str | list[dict], user_id: str | None, template: str | None):
    """The "user id in the prompt text" baseline (what people do with TRL today): ``template``
    (e.g. ``"[user: {user_id}]\n"``) before a text prompt, or as a system message of a chat."""
    if not template:
        return prompt
    tag = template.format(user_id=user_id if user_id is not None else "unknown")
    if _is_messages(prompt):
        return [{"role": "system", "content": tag.strip()}] + list(prompt)
    return tag + prompt


def _truncate_prompt(prompt_ids: list[int], keep: int, bos_id: int | None, head: int = 0) -> list[int]:
    """The prompt cut to ``keep`` tokens (plus ``head``): BOS and the first ``head`` tokens after it
    (the user-id tag of the id-in-prompt baseline) stay, then the prompt's end."""
    start = 1 if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id else 0
    if len(prompt_ids) <= keep + head:
        return prompt_ids
    tail = max(keep - start, 0)
    return prompt_ids[: start + head] + prompt_ids[len(prompt_ids) - tail:]


def _tag_tokens(tokenizer, prompt, tagged, ids_tagged: list[int]) -> int:
    """How many tokens the user-id tag adds in front of the prompt (0 without a tag)."""
    if tagged is prompt:
        return 0
    return max(len(ids_tagged) - len(tokenize_prompt(tokenizer, prompt)), 0)


def tokenize_pair(rec: dict, tokenizer, settings: TokenizeSettings, user_row: int) -> dict | None:
    """Token ids of one preference record; ``None`` when truncation leaves no response token."""
    prompt = with_user_id(rec["prompt"], rec.get("user_id"), settings.user_id_prompt)
    prompt_ids, chosen_ids = tokenize_response(tokenizer, prompt, rec["chosen"])
    prompt_r, rejected_ids = tokenize_response(tokenizer, prompt, rec["rejected"])
    n = min(len(prompt_ids), len(prompt_r))  # a common prompt for both responses
    chosen_ids = prompt_ids[n:] + chosen_ids
    rejected_ids = prompt_r[n:] + rejected_ids
    prompt_ids = prompt_ids[:n]
    # the id-in-prompt baseline's tag, like the user prefix, comes on top of the prompt's budget and is never cut
    tag = _tag_tokens(tokenizer, rec["prompt"], prompt, prompt_ids) if settings.user_id_prompt else 0
    text_ids = encode_user_text(tokenizer, rec.get("user_text"), settings.max_user_text_tokens)
    if settings.max_prompt_length is not None:
        prompt_ids = _truncate_prompt(prompt_ids, settings.max_prompt_length, tokenizer.bos_token_id, tag)
    if settings.max_length is not None:
        # the user prefix is not counted: every user model (and vanilla DPO) scores the same response tokens
        room = settings.max_length - (len(prompt_ids) - tag)
        if room <= 0:
            return None
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "user_text_ids": text_ids,
        "user_row": user_row,
        "user_id": rec.get("user_id"),
    }


def tokenize_dataset(records: list[dict], tokenizer, settings: TokenizeSettings, registry, name: str = "data") -> list[dict]:
    """Tokenize every record; records left without response tokens are skipped, counted and reported."""
    out, skipped = [], []
    for i, rec in enumerate(records):
        ex = tokenize_pair(rec, tokenizer, settings, registry.row(rec.get("user_id")))
        if ex is None:
            skipped.append(i)
            continue
        ex["index"] = i
        out.append(ex)
    if skipped:
        logger.warning(
            "%s: skipped %d of %d records whose prompt and user prefix fill max_length=%s (first: record %d); "
            "raise max_length or lower max_prompt_length",
            name, len(skipped), len(records), settings.max_length, skipped[0],
        )
    if not out:
        raise DataError(f"{name}: every record was skipped by truncation (max_length={settings.max_length})")
    return out
