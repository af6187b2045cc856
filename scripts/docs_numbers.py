"""List the measured-looking numbers in the prose of README.md and docs/*.md (outside generated
tables and code) that no committed JSON under docs/ holds (to the digits shown), so that a
number typed by hand is found. A reviewing aid, not a test: prose may restate a difference or a
ratio of two recorded values, which this does not compute.

    python scripts/docs_numbers.py [--all]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import docs_tables  # noqa: E402

NUMBER = re.compile(r"(?<![\w.\-/])[+-]?\d[\d,]*\.\d+(?![\w.])")


def recorded() -> set[str]:
    """Every number under docs/runs and docs/benchmarks, as strings at 1-6 decimals."""
    out: set[str] = set()

    def walk(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            for d in (1, 2, 3, 4, 5, 6):
                out.add(f"{abs(x):.{d}f}")
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            for m in NUMBER.findall(x):
                out.add(m.lstrip("+-").replace(",", ""))

    for p in list((ROOT / "docs/runs").rglob("*.json")) + list((ROOT / "docs/benchmarks").glob("*.json")):
        try:
            walk(json.loads(p.read_text()))
        except json.JSONDecodeError:
            pass
    return out


def prose(text: str) -> str:
    text = docs_tables.BLOCK.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`]*`", "", text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="also numbers with one decimal")
    a = ap.parse_args()
    known = recorded()
    missing = 0
    for doc in docs_tables.DOCS:
        for i, line in enumerate(prose(doc.read_text()).splitlines(), 1):
            for m in NUMBER.findall(line):
                value = m.lstrip("+-").replace(",", "")
                if (not a.all and len(value.split(".")[1]) < 2) or value in known:
                    continue
                missing += 1
                print(f"{doc.relative_to(ROOT)}: {m}  | {line.strip()[:110]}")
    print(f"{missing} prose numbers not found in a committed JSON")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
