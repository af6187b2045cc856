"""What every data source shares: the conversion result, seeded stable splits, output files, summary.

Every converter returns a ``Conversion``: canonical records for ``train`` (seen users),
``test`` (held-out pairs of seen users), ``unseen`` (pairs of users kept out of training), a
``users`` table (one entry per user: id, seen, and what the source knows of them) and counts
of records read, written and skipped by reason. ``write_conversion`` writes
``train.jsonl``, ``test.jsonl``, ``unseen.jsonl`` (when there are unseen users) and
``users.json``, and the summary table is printed by the CLI.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError
from ..storage import MANIFEST_NAME, atomic_write_text, check_output_path, save_folder, write_manifest

FRACTION_OPTIONS = ("test_fraction", "long_share", "unseen_fraction", "majority_share")


@dataclass
class Conversion:
    source: str
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    unseen: list[dict] = field(default_factory=list)
    users: dict[str, dict] = field(default_factory=dict)  # user id -> {"seen": bool, ...}
    read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    notes: Counter = field(default_factory=Counter)  # things done to kept records, e.g. prompts cleaned
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in FRACTION_OPTIONS:
            value = self.options.get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{self.source}: {key} must lie in [0, 1], got {value!r}")

    @property
    def written(self) -> int:
        return len(self.train) + len(self.test) + len(self.unseen)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def summary_rows(self) -> list[tuple[str, int]]:
        rows = [("records read", self.read), ("pairs written", self.written), ("  train", len(self.train)),
                ("  test", len(self.test)), ("  unseen", len(self.unseen)),
                ("users seen", sum(1 for u in self.users.values() if u["seen"])),
                ("users unseen", sum(1 for u in self.users.values() if not u["seen"]))]
        rows += [(f"skipped: {reason}", n) for reason, n in sorted(self.skipped.items())]
        rows += [(f"note: {what}", n) for what, n in sorted(self.notes.items())]
        return rows

    def summary_table(self) -> str:
        lines = [f"| {self.source} | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.summary_rows()]
        return "\n".join(lines)

    def summary_dict(self) -> dict:
        return {"source": self.source, "read": self.read, "written": self.written, "train": len(self.train),
                "test": len(self.test), "unseen": len(self.unseen), "skipped": dict(self.skipped),
                "notes": dict(self.notes),
                "users_seen": sum(1 for u in self.users.values() if u["seen"]),
                "users_unseen": sum(1 for u in self.users.values() if not u["seen"])}


def stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): splits do not depend on record order or Python's hash."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_test(prompt_key: str, test_fraction: float, seed: int) -> bool:
    """Held-out by prompt, so that no test prompt is seen in training."""
    return stable_fraction("test:" + prompt_key, seed) < test_fraction


def assign_split(conv: Conversion, rec: dict, prompt_key: str, test_fraction: float, seed: int) -> None:
    """Route one record of a known user to train, test or unseen; count its pair for the user."""
    user = conv.users[rec["user_id"]]
    user["n_pairs"] = user.get("n_pairs", 0) + 1
    if not user["seen"]:
        conv.unseen.append(rec)
    elif in_test(prompt_key, test_fraction, seed):
        conv.test.append(rec)
    else:
        conv.train.append(rec)


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


OUTPUT_NAMES = ("train.jsonl", "test.jsonl", "unseen.jsonl", "users.json", MANIFEST_NAME)


def write_conversion(conv: Conversion, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the split files and ``users.json`` as one folder, atomically (with ``manifest.json``).

    A non-empty folder is refused unless ``overwrite``; then the files of the previous conversion
    are replaced as a whole (an ``unseen.jsonl`` of an earlier conversion never survives) and
    other files in the folder are left alone."""
    out = Path(out_dir)
    check_output_path(out, "--output")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            names = sorted(p.name for p in out.iterdir())
            raise ValueError(f"{out}: not empty ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); "
                             "pass --overwrite to replace the conversion in it, or choose an empty folder")
        for name in OUTPUT_NAMES:
            if (out / name).is_file():
                (out / name).unlink()
    if not conv.train and not conv.test and not conv.unseen:
        raise ValueError(f"{conv.source}: the conversion holds no pairs ({conv.summary_dict()}); nothing written")
    users = [{"user_id": uid, **info} for uid, info in conv.users.items()]
    meta = {"source": conv.source, "options": conv.options, "summary": conv.summary_dict(), "users": users}

    def write(tmp: Path) -> None:
        write_jsonl(tmp / "train.jsonl", conv.train)
        write_jsonl(tmp / "test.jsonl", conv.test)
        if conv.unseen or any(not u["seen"] for u in conv.users.values()):
            write_jsonl(tmp / "unseen.jsonl", conv.unseen)
        atomic_write_text(tmp / "users.json", json.dumps(meta, indent=1, ensure_ascii=False))

    if out.is_dir() and any(out.iterdir()):  # --overwrite: old outputs are gone, other files stay as they are
        write(out)
        write_manifest(out, [n for n in OUTPUT_NAMES if n != MANIFEST_NAME and (out / n).is_file()])
    else:
        save_folder(out, write)
    return out


def load_hub_dataset(name: str, config: str | None, split: str):
    """A hub data set through ``datasets`` (only when the hub is reachable)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name}: not a local file; loading it from the Hugging Face hub needs the `datasets` package "
                        "(pip install 'prlhf[hub]'). Offline, pass a local file.") from None
    try:
        return [dict(r) for r in load_dataset(name, config, split=split)]
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face hub failed "
                        f"({type(err).__name__}: {str(err)[:200]}). Offline, pass a local file.") from None


def where(path, i: int, row: dict) -> str:
    line = row.get("_line")
    return f"{path}: record {i}" + (f" (line {line})" if line else "")


FORMATS = ("chat", "text")


def instruction_pair(instruction: str, chosen: str, rejected: str, fmt: str = "chat") -> dict:
    """An instruction and two answers as canonical fields: chat messages (``chat``, through the
    tokenizer's chat template) or plain text ``"Instruction: ...\\nResponse:"`` + ``" " + answer``."""
    if fmt == "chat":
        return {"prompt": [{"role": "user", "content": instruction}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if fmt == "text":
        return {"prompt": f"Instruction: {instruction}\nResponse:", "chosen": " " + chosen.strip(),
                "rejected": " " + rejected.strip()}
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
