"""The user registry: external user ids (strings) <-> rows of the user model.

Row 0 is the generic user e_0. It serves every id that is ``None``, empty or unknown (users
absent from training), and it is the user that the generic term of P-DPO substitutes for the
real one. Known users take rows 1..n in the order they were first seen. The registry is saved
next to the model as ``users.json``, together with each user's text when the data had one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

GENERIC_ROW = 0


class UserRegistry:
    def __init__(self, user_ids: Iterable[str] = (), user_texts: dict[str, str] | None = None,
                 pair_counts: dict[str, int] | None = None):
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}
        self.user_texts: dict[str, str] = dict(user_texts or {})
        # labelled pairs each user contributed (training, then adaptation); absent when unknown
        self.pair_counts: dict[str, int] = dict(pair_counts or {})
        for uid in user_ids:
            self.add(uid)

    @classmethod
    def from_records(cls, records: Iterable[dict]) -> "UserRegistry":
        """All distinct non-null ``user_id`` values of the records, in order of first appearance."""
        reg = cls()
        for rec in records:
            uid = rec.get("user_id")
            if uid is not None and str(uid) != "":
                reg.add(str(uid))
                reg.pair_counts[str(uid)] = reg.pair_counts.get(str(uid), 0) + 1
                text = rec.get("user_text")
                if text and str(uid) not in reg.user_texts:
                    reg.user_texts[str(uid)] = text
        return reg

    def add(self, user_id: str) -> int:
        if user_id not in self._rows:
            self.ids.append(user_id)
            self._rows[user_id] = len(self.ids)  # row 0 is the generic user
        return self._rows[user_id]

    def remove(self, user_id: str) -> int:
        """Forget a user: their id, text and counts; returns the row they had (later users move up
        one row, as the user model's ``remove_row`` moves their parameters)."""
        row = self._rows.get(str(user_id))
        if row is None:
            raise KeyError(f"unknown user {user_id!r}")
        self.ids.pop(row - 1)
        self._rows = {uid: i + 1 for i, uid in enumerate(self.ids)}
        self.user_texts.pop(str(user_id), None)
        self.pair_counts.pop(str(user_id), None)
        return row

    def row(self, user_id: str | None) -> int:
        """The row of a user; the generic row 0 for ``None``, ``""`` and unknown ids."""
        if user_id is None:
            return GENERIC_ROW
        return self._rows.get(str(user_id), GENERIC_ROW)

    def __contains__(self, user_id: object) -> bool:
        return user_id is not None and str(user_id) in self._rows

    @property
    def n_rows(self) -> int:
        """Rows of the user model: the generic user plus every known user."""
        return len(self.ids) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def to_dict(self) -> dict:
        return {"generic_row": GENERIC_ROW, "users": self.ids, "user_texts": self.user_texts,
                "pair_counts": self.pair_counts}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "UserRegistry":
        """A saved registry; errors name the file and what is wrong with it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the user registry is missing")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise ValueError(f"{path}: field 'users' must be a list of user-id strings")
        if len(set(users)) != len(users):
            raise ValueError(f"{path}: field 'users' lists a user id twice")
        texts = data.get("user_texts") or {}
        if not isinstance(texts, dict):
            raise ValueError(f"{path}: field 'user_texts' must be an object {{user_id: text}}")
        counts = data.get("pair_counts") or {}
        if not isinstance(counts, dict) or not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            raise ValueError(f"{path}: field 'pair_counts' must be an object {{user_id: number of pairs}}")
        return cls(users, texts, counts)
