"""P-SOUPS (Jang et al. 2023, RLPHF) -> one user per preference profile.

Input, any of:
* a folder of the RLPHF files ``P1A.json ... P3B.json`` (JSON lists of ``user_input``,
  ``completion_a`` = chosen, ``completion_b`` = rejected; the profile is read from the file name);
* one such file;
* a JSONL/JSON file or hub data set with columns ``uid``, ``prompt``, ``chosen``, ``rejected``.

The profiles (P1A/P1B: elementary vs expert; P2A/P2B: concise vs informative; P3A/P3B:
friendly vs unfriendly) conflict pairwise. As in the P-RLHF paper, the preference instruction
that RLPHF appended to each prompt ("Generate a response that ...") is removed, so the model has
to learn the preference from the user, not read it in the prompt. ``profiles_dir`` (the
``pref1A.txt ...`` annotator instructions) adds each profile's description to ``users.json``,
and ``user_text="profile"`` turns it into the user's text (the explicit user model).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..data import DataError, read_records
from .common import Conversion, assign_split, instruction_pair, load_hub_dataset, where

PROFILE_ID = re.compile(r"(?:^|[^A-Za-z0-9])(?:P|pref)([1-3][A-D])(?:[^A-Za-z0-9]|$)", re.IGNORECASE)
# The preference instruction of RLPHF, appended after the task ("... Generate a response that ...").
PREFERENCE_PROMPT = re.compile(
    r"\s*Generate a response (?:that|in|which|like)\b[^\n]*$")
PROFILE_GOAL = re.compile(r"select the response that (.*?)(?: for a given instruction)?\.", re.IGNORECASE | re.DOTALL)


def profile_id(name: str) -> str | None:
    """``P1A`` from ``P1A.json``, ``alpaca_gpt4_P1A_10k.json`` or ``pref1A.txt``."""
    m = PROFILE_ID.search(Path(name).stem if "." in name else name)
    return "P" + m.group(1).upper() if m else None


def strip_preference_prompt(prompt: str) -> tuple[str, bool]:
    """Remove a trailing "Generate a response that ..." instruction; return (prompt, removed)."""
    cleaned = PREFERENCE_PROMPT.sub("", prompt)
    return cleaned.rstrip(), cleaned != prompt


def read_profiles(profiles_dir: str | Path) -> dict[str, str]:
    """Profile id -> what that annotator prefers, from RLPHF's ``prefXY.txt`` instructions."""
    out = {}
    for path in sorted(Path(profiles_dir).glob("*.txt")):
        pid = profile_id(path.name)
        m = PROFILE_GOAL.search(path.read_text(encoding="utf-8"))
        if pid and m:
            out[pid] = " ".join(m.group(1).split())
    return out


def _rows(input: str) -> list[tuple[str, int, dict, str | None]]:
    """(source name, index, row, profile from the file name) for every input row."""
    path = Path(input)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json*") if profile_id(p.name))
        if not files:
            raise DataError(f"{path}: no P-SOUPS files (P1A.json ... P3B.json) in this folder")
        return [(str(f), i, row, profile_id(f.name)) for f in files for i, row in enumerate(read_records(f))]
    if path.exists():
        pid = profile_id(path.name)
        return [(str(path), i, row, pid) for i, row in enumerate(read_records(path))]
    return [(input, i, row, None) for i, row in enumerate(load_hub_dataset(input, None, "train"))]


def _fields(row: dict, w: str, file_profile: str | None) -> tuple[str, str, str, str]:
    if "user_input" in row:  # RLPHF layout
        names = ("user_input", "completion_a", "completion_b")
        uid = file_profile
    elif "prompt" in row:  # hub mirror layout
        names = ("prompt", "chosen", "rejected")
        uid = row.get("uid") if row.get("uid") is not None else file_profile
    else:
        raise DataError(f"{w}: unknown P-SOUPS layout: expected 'user_input'/'completion_a'/'completion_b' "
                        f"or 'uid'/'prompt'/'chosen'/'rejected'")
    values = []
    for name in names:
        if not isinstance(row.get(name), str):
            raise DataError(f"{w}: field '{name}' is missing or not a string")
        values.append(row[name])
    if uid is None or str(uid) == "":
        raise DataError(f"{w}: no user: field 'uid' is missing and the file name names no profile (P1A ... P3B)")
    return str(uid), *values


def convert_psoups(input: str, unseen_users=(), test_fraction: float = 0.1, seed: int = 0,
                   keep_preference_prompt: bool = False, profiles_dir: str | None = None,
                   user_text: str = "none", format: str = "chat") -> Conversion:
    if user_text not in ("none", "profile"):
        raise ValueError(f"user_text must be 'none' or 'profile', got {user_text!r}")
    profiles = read_profiles(profiles_dir) if profiles_dir else {}
    if user_text == "profile" and not profiles:
        raise ValueError("user_text='profile' needs profiles_dir with the pref1A.txt ... pref3B.txt files")
    rows = _rows(input)
    conv = Conversion("psoups", read=len(rows), options=dict(
        unseen_users=sorted(unseen_users), test_fraction=test_fraction, seed=seed,
        keep_preference_prompt=keep_preference_prompt, user_text=user_text, format=format))
    for name, i, row, file_profile in rows:
        w = where(name, i, row)
        uid, prompt, chosen, rejected = _fields(row, w, file_profile)
        if not chosen.strip() or not rejected.strip():
            conv.skip("empty response")
            continue
        if chosen.strip() == rejected.strip():
            conv.skip("identical responses")
            continue
        if not keep_preference_prompt:
            prompt, removed = strip_preference_prompt(prompt)
            if removed:
                conv.notes["preference instruction removed from prompt"] += 1
        if uid not in conv.users:
            conv.users[uid] = {"seen": uid not in unseen_users, "n_pairs": 0}
            if uid in profiles:
                conv.users[uid]["profile"] = profiles[uid]
        text = f"I prefer responses that {profiles[uid]}." if user_text == "profile" and uid in profiles else None
        rec = {"user_id": uid, **instruction_pair(prompt, chosen, rejected, format), "user_text": text}
        assign_split(conv, rec, prompt, test_fraction, seed)
    return conv
