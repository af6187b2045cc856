"""Run records: what a committed result (``docs/runs/<run>/``) needs besides the tool's own report
to be reproduced: the exact command, the git commit, the date, the machine and the library versions.

    python -m prlhf.runs record --command "bash recipes/smollm2_tldr_defaults.sh" \\
        --copy outputs/x/report.json --out docs/runs/tldr_defaults_half2

writes ``run.json`` (keys ``command``, ``commit``, ``date``, ``machine``, and one key per package:
``python``, ``torch``, ``transformers``, ``peft``, ``accelerate``, ``trl``, ``prlhf``) and copies the
given report files beside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from .report import differences_table, fmt_interval, fmt_number

PACKAGES = ("torch", "transformers", "peft", "accelerate", "trl", "prlhf")


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine() -> dict:
    """CPU, cores, memory and GPU (if any) of this machine."""
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    return info


def git_commit(root: str | os.PathLike = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+uncommitted" if dirty else "")) if out.returncode == 0 else None


def run_record(command: str, date: str | None = None, note: str | None = None, **extra) -> dict:
    """The ``run.json`` of a run made now on this machine (``date``: ISO date of the run, default today)."""
    rec = {"command": command, "commit": git_commit(Path(__file__).resolve().parents[2]),
           "date": date or datetime.date.today().isoformat(), "machine": machine(),
           "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            rec[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            rec[pkg] = None
    if note:
        rec["note"] = note
    rec.update(extra)
    return rec


def benchmark_record(argv: list[str] | None = None, **extra) -> dict:
    """The ``run.json`` block a benchmark writes into its JSON (key ``run``): this process's command
    line, commit, date, machine and versions."""
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    return run_record("python " + " ".join(shlex.quote(a) for a in argv), **extra)


def documented_commands(path) -> list[list[str]]:
    """The `prlhf sft` / `prlhf train` command lines of a YAML recipe's comment header."""
    import re
    import shlex

    cmds = []
    for line in Path(path).read_text().splitlines():
        if not line.startswith("#"):
            break
        text = re.sub(r"^#\s*(?:Run:|Then:)?\s*", "", line)
        if text.startswith(("prlhf sft", "prlhf train")):
            cmds.append(shlex.split(text)[1:])
    return cmds


def report_table(report: dict) -> str:
    """A markdown table of a recipe's ``report.json``: accuracy (seen, generic, unseen) with 95%
    intervals, the flip rate overall and per group, accuracy per group, and the paired difference
    to the first method on seen pairs."""
    methods = report["methods"]
    groups = sorted({g for m in methods.values() for g in (m.get("flip_rate_by_group") or {})})
    if groups == ["all"]:  # no groups in users.json: the one "all" group repeats the overall columns
        groups = []
    head = ["method", "acc seen", "acc generic", "acc unseen", "flip rate"]
    head += [f"flip {g}" for g in groups] + [f"acc {g}" for g in groups] + ["seen - first (paired)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        acc, ci = m["accuracy"], m.get("accuracy_ci", {})
        diff = (m.get("accuracy_difference") or {}).get("seen")
        cells = [name, fmt_number(acc["seen"]) + fmt_interval(ci.get("seen")), fmt_number(acc["generic"]), fmt_number(acc["unseen"]) + fmt_interval(ci.get("unseen")),
                 fmt_number(m.get("flip_rate"))]
        cells += [fmt_number((m.get("flip_rate_by_group") or {}).get(g)) for g in groups]
        cells += [fmt_number((m.get("accuracy_by_group") or {}).get(g)) for g in groups]
        cells.append("-" if not diff else f"{diff['mean']:+.3f}{fmt_interval(diff.get('ci'))}")
        rows.append("| " + " | ".join(cells) + " |")
    pairwise = differences_table(methods)  # three or more methods: each minus each earlier one
    return "\n".join(rows) + ("\n\n" + pairwise if pairwise else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prlhf.runs", description="Write a run record (docs/runs/<run>/run.json).")
    sub = ap.add_subparsers(dest="action", required=True)
    r = sub.add_parser("record")
    r.add_argument("--command", required=True, help="the exact command the run was made with")
    r.add_argument("--out", required=True, help="folder of the run (docs/runs/<run>)")
    r.add_argument("--copy", nargs="*", default=[], help="report files to copy beside run.json")
    r.add_argument("--date", default=None, help="ISO date of the run (default: today)")
    r.add_argument("--note", default=None, help="what else a reader must know (data half, overrides, ...)")
    r.add_argument("--seconds", type=float, default=None, help="wall time of the whole command")
    t = sub.add_parser("table", help="print the markdown table of a recipe's report.json")
    t.add_argument("report")
    a = ap.parse_args(argv)
    if a.action == "table":
        report = json.loads(Path(a.report).read_text())
        print(report_table(report))
        if report.get("runtime_seconds"):
            print(f"\nruntime {report['runtime_seconds']:.0f} s")
        return 0
    from .storage import atomic_write_text

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in a.copy:
        shutil.copy2(f, out / Path(f).name)
    extra = {"wall_seconds": a.seconds} if a.seconds is not None else {}
    atomic_write_text(out / "run.json", json.dumps(run_record(a.command, a.date, a.note, **extra), indent=1) + "\n")
    print(f"wrote {out / 'run.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
