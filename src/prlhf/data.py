"""Preference data: the canonical record, its validation, tokenization and batching.

A record (one JSON object per line, or a row of any ``datasets`` dataset)::

    {"user_id": str | null, "prompt": str | [messages], "chosen": str | [messages],
     "rejected": str | [messages], "user_text": str | null, ...metadata}

``user_id`` null (or an id unknown to the model) means the generic user. Messages are
``{"role": ..., "content": ...}`` dicts and go through the tokenizer's chat template; plain
strings are concatenated (``prompt + chosen + eos``), as TRL does. Extra fields are kept.

A tokenized pair holds ``prompt_ids`` (with BOS when the tokenizer adds one), ``chosen_ids``,
``rejected_ids``, ``user_text_ids`` and ``user_row``. The collator lays out each sequence as

    [BOS] [T_u implicit user slots] [user text tokens] [prompt] [response] [padding]

and marks the user positions, so that the model can scatter the implicit user embedding into
the slots and the reference model (no user input) can mask all of them out.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


# ---------------------------------------------------------------------------------------------
# Batching


USER_POSITIONS = ("prefix", "before_response")
# reward models may also read the user after the response: the last token is then the user's, and
# its hidden state (what the reward head reads) is the user's query over the whole response
REWARD_USER_POSITIONS = USER_POSITIONS + ("after_response",)


def build_sequence(prompt_ids: list[int], response_ids: list[int], user_text_ids: list[int], n_user_tokens: int,
                   bos_id: int | None, slot_id: int, user_position: str = "prefix"
                   ) -> tuple[list[int], list[int], list[bool], list[bool]]:
    """One sequence: (ids, labels, implicit_mask, user_mask). The user prefix (implicit slots, then
    the user's text) goes after BOS (``prefix``, the paper's layout), between the prompt and the
    response (``before_response``: the prompt is then the same for every user) or, for reward
    models, after the response (``after_response``)."""
    prefix = [slot_id] * n_user_tokens + list(user_text_ids)
    body = list(prompt_ids) + list(response_ids)
    if user_position == "after_response":
        at = len(body)
    elif user_position == "before_response":
        at = len(prompt_ids)
    else:
        at = 1 if bos_id is not None and prompt_ids[:1] == [bos_id] else 0
    ids = body[:at] + prefix + body[at:]
    start = len(prompt_ids) + (len(prefix) if at <= len(prompt_ids) else 0)  # where the response begins
    labels = [-100] * start + list(response_ids) + [-100] * (len(ids) - start - len(response_ids))
    implicit = [False] * at + [True] * n_user_tokens + [False] * (len(ids) - at - n_user_tokens)
    user = [False] * at + [True] * len(prefix) + [False] * (len(ids) - at - len(prefix))
    return ids, labels, implicit, user


def pad_batch(rows: list[list], value, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    if side == "right":
        return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])
    if side == "left":
        return torch.tensor([[value] * (width - len(r)) + list(r) for r in rows])
    raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")


def collate_sequences(seqs: list[tuple], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    ids, labels, implicit, user = zip(*seqs)
    return {
        "input_ids": pad_batch(ids, pad_id, side),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, side),
        "labels": pad_batch(labels, -100, side),
        "implicit_mask": pad_batch(implicit, False, side),
        "user_mask": pad_batch(user, False, side),
    }


def build_packed_sequence(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], user_text_ids: list[int],
                          n_user_tokens: int, bos_id: int | None, slot_id: int, user_position: str = "prefix",
                          n_terms: int = 1):
    """A shared-prompt packed sequence: ``[BOS] [user prefix] [prompt] [chosen] [rejected]``
    (``prefix``), or ``[BOS] [prompt]`` then, for each of ``n_terms`` users (P-DPO's user and
    generic terms), ``[user prefix] [chosen] [rejected]`` (``before_response``: the prompt once for
    every term).

    Returns (ids, branch, parent, implicit_mask, user_mask, preds): ``branch`` numbers the segments
    (0 the shared part; per term, 3k+1 its user prefix, 3k+2 chosen, 3k+3 rejected; in the prefix
    layout the prefix is shared: 1 chosen, 2 rejected), ``parent`` gives each token's parent segment
    (0, or its term's user prefix): a token sees earlier tokens of branch 0, of its own branch and of
    its parent. ``preds`` holds per term (chosen_pred, ref_chosen_pred, rejected_pred,
    ref_rejected_pred): for each response token, the position whose hidden state predicts it (the
    token before it: the user prefix's last token, or the prompt's, for the first one), and the
    same with the user prefix hidden (the reference: the prompt's last token for the first one)."""
    if user_position != "before_response":
        if n_terms != 1:
            raise ValueError("several terms in one packed sequence need user_position='before_response'")
        ids, _, implicit, user = build_sequence(prompt_ids, [], user_text_ids, n_user_tokens, bos_id, slot_id)
        start = len(ids)
        ids = ids + list(chosen_ids) + list(rejected_ids)
        branch = [0] * start + [1] * len(chosen_ids) + [2] * len(rejected_ids)
        implicit = implicit + [False] * (len(chosen_ids) + len(rejected_ids))
        user = user + [False] * (len(chosen_ids) + len(rejected_ids))
        chosen_pred = ([start - 1] + list(range(start, start + len(chosen_ids) - 1)))[:len(chosen_ids)]
        r0 = start + len(chosen_ids)
        rejected_pred = ([start - 1] + list(range(r0, r0 + len(rejected_ids) - 1)))[:len(rejected_ids)]
        return ids, branch, [0] * len(ids), implicit, user, [(chosen_pred, chosen_pred, rejected_pred, rejected_pred)]
    ids = list(prompt_ids)
    branch, parent, implicit, user = [0] * len(ids), [0] * len(ids), [False] * len(ids), [False] * len(ids)
    last_prompt = len(ids) - 1
    prefix = [slot_id] * n_user_tokens + list(user_text_ids)
    preds = []
    for k in range(n_terms):
        u_b, c_b, r_b = 3 * k + 1, 3 * k + 2, 3 * k + 3
        ids += prefix
        branch += [u_b] * len(prefix)
        parent += [0] * len(prefix)
        implicit += [True] * n_user_tokens + [False] * len(user_text_ids)
        user += [True] * len(prefix)
        last_user = len(ids) - 1 if prefix else last_prompt
        term = []
        for response, b in ((chosen_ids, c_b), (rejected_ids, r_b)):
            start = len(ids)
            ids += list(response)
            branch += [b] * len(response)
            parent += [u_b] * len(response)
            implicit += [False] * len(response)
            user += [False] * len(response)
            follow = list(range(start, start + len(response) - 1))
            term += [([last_user] + follow)[:len(response)], ([last_prompt] + follow)[:len(response)]]
        preds.append(tuple(term))
    return ids, branch, parent, implicit, user, preds


@dataclass
class PreferenceCollator:
    """Batches tokenized pairs, in one of two layouts.

    * plain (``packing=False``, the reference implementation): 2B sequences, chosen rows 0..B-1
      then rejected rows B..2B-1, each ``[BOS] [user prefix] [prompt] [response]``;
    * packed (``packing=True``): B sequences ``[BOS] [user prefix] [prompt] [chosen] [rejected]``
      with a ``branch`` map from which the model builds a 4D attention mask (rejected does not see
      chosen) and position ids (rejected restarts where the prompt ends): the prompt is processed
      once per pair instead of twice.

    Both carry the response tokens to score as flat targets: ``target_row``/``target_col`` (the
    position whose hidden state predicts the token), ``target_ids`` and ``target_seq`` (0..B-1
    chosen of pair i, B..2B-1 rejected), so that the LM head runs at those positions only.
    ``row_pair`` maps each row to its pair, ``n_tokens`` counts response tokens per sequence (2B,),
    and ``ref_logps`` (2B,) is filled from the examples' precomputed reference log-probs when
    they have them. ``with_user=False`` leaves the user prefix out (the reference sees no user).
    """

    pad_token_id: int
    bos_token_id: int | None
    n_user_tokens: int = 0
    padding_side: str = "right"
    packing: bool = False
    with_user: bool = True
    user_position: str = "prefix"
    n_terms: int = 1  # terms packed into one row (before_response + packing only)

    def __post_init__(self):
        if self.user_position not in REWARD_USER_POSITIONS:
            raise ValueError(f"user_position must be one of {REWARD_USER_POSITIONS}, got {self.user_position!r}")
        if self.packing and self.user_position == "after_response":
            raise ValueError("user_position='after_response' (reward models) has no packed layout")
        if self.n_terms != 1 and not (self.packing and self.user_position == "before_response"):
            raise ValueError("several terms per row need packing=True and user_position='before_response'")

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        B = len(examples)
        n_slots = self.n_user_tokens if self.with_user else 0
        text = (lambda ex: ex["user_text_ids"]) if self.with_user else (lambda ex: [])  # noqa: E731
        layout = self.user_position if self.with_user else "prefix"  # no user: both layouts are the same sequence
        # targets: (row, position predicting the token, the same with the user hidden, token id, sequence)
        seqs, targets = [], []
        if self.packing:
            branches, parents = [], []
            for i, ex in enumerate(examples):
                ids, branch, parent, implicit, user, preds = build_packed_sequence(
                    ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], text(ex), n_slots, self.bos_token_id,
                    self.pad_token_id, layout, self.n_terms)
                seqs.append((ids, [-100] * len(ids), implicit, user))
                branches.append(branch)
                parents.append(parent)
                for k, (c_pred, c_ref, r_pred, r_ref) in enumerate(preds):
                    targets += [(i, p, q, t, 2 * B * k + i) for p, q, t in zip(c_pred, c_ref, ex["chosen_ids"]) if p >= 0]
                    targets += [(i, p, q, t, 2 * B * k + B + i) for p, q, t in zip(r_pred, r_ref, ex["rejected_ids"]) if p >= 0]
            row_pair = list(range(B))
        else:
            for j, key in enumerate(("chosen_ids", "rejected_ids")):
                for i, ex in enumerate(examples):
                    seq = build_sequence(ex["prompt_ids"], ex[key], text(ex), n_slots, self.bos_token_id, self.pad_token_id,
                                         layout)
                    seqs.append(seq)
                    start = len(ex["prompt_ids"]) if layout == "after_response" else len(seq[0]) - len(ex[key])
                    # with the user hidden, the first response token follows the prompt's last token
                    first_ref = len(ex["prompt_ids"]) - 1 if layout != "prefix" else start - 1
                    targets += [(j * B + i, start - 1 + k, first_ref if k == 0 else start - 1 + k, t, j * B + i)
                                for k, t in enumerate(ex[key]) if start - 1 + k >= 0]
            row_pair = list(range(B)) * 2
        batch = collate_sequences(seqs, self.pad_token_id, self.padding_side)
        width = batch["input_ids"].shape[1]
        lengths = [len(s[0]) for s in seqs]
        if self.packing:
            batch["branch"] = pad_batch(branches, -1, self.padding_side)
            if layout == "before_response":
                batch["parent"] = pad_batch(parents, 0, self.padding_side)
            del batch["labels"]
        shift = [width - n if self.padding_side == "left" else 0 for n in lengths]
        rows, cols, ref_cols, ids, seq = zip(*targets) if targets else ((), (), (), (), ())
        batch["target_row"] = torch.tensor(rows, dtype=torch.long)
        batch["target_col"] = torch.tensor([c + shift[r] for r, c in zip(rows, cols)], dtype=torch.long)
        if layout == "before_response":  # where the reference (user hidden) predicts each target
            batch["ref_target_col"] = torch.tensor([c + shift[r] for r, c in zip(rows, ref_cols)], dtype=torch.long)
        batch["target_ids"] = torch.tensor(ids, dtype=torch.long)
        batch["target_seq"] = torch.tensor(seq, dtype=torch.long)
        batch["n_tokens"] = torch.bincount(batch["target_seq"], minlength=2 * B * self.n_terms)
        if self.n_terms != 1:
            batch["n_terms"] = torch.tensor(self.n_terms)
        batch["row_pair"] = torch.tensor(row_pair, dtype=torch.long)
        batch["user_rows"] = torch.tensor([ex["user_row"] for ex in examples], dtype=torch.long)  # (B,)
        batch["index"] = torch.tensor([ex.get("index", -1) for ex in examples], dtype=torch.long)
        has_ref = ["ref_logps" in ex for ex in examples]
        if any(has_ref):
            if not all(has_ref):
                raise ValueError("a batch mixes examples with and without precomputed reference log-probs")
            batch["ref_logps"] = torch.tensor([ex["ref_logps"][0] for ex in examples] + [ex["ref_logps"][1] for ex in examples],
                                              dtype=torch.float32)
        return batch


@dataclass
class SFTCollator:
    """Batches prompt -> chosen sequences without any user input (the SFT step builds pi_SFT)."""

    pad_token_id: int
    bos_token_id: int | None
    padding_side: str = "right"

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        seqs = [build_sequence(ex["prompt_ids"], ex["chosen_ids"], [], 0, self.bos_token_id, self.pad_token_id) for ex in examples]
        return collate_sequences(seqs, self.pad_token_id, self.padding_side)
