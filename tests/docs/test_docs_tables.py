"""The tables of README.md and docs/*.md are what `python scripts/docs_tables.py` writes from the
committed run files (docs/runs/, docs/benchmarks/); no table of measured numbers is typed by hand."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
dt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dt)

MEASURED = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")  # 0.711, 14.000, 2.81: a measured value, not a setting


def test_every_generated_table_matches_its_source():
    stale = []
    for doc in dt.DOCS:
        _, changed = dt.update(doc)
        stale += [f"{doc.relative_to(ROOT)}: {spec}" for spec in changed]
    assert not stale, "tables differ from their sources (run `python scripts/docs_tables.py`):\n" + "\n".join(stale)


def test_no_hand_typed_table_of_numbers():
    for doc in dt.DOCS:
        text = dt.BLOCK.sub("", doc.read_text())
        rows = [line for line in text.splitlines() if line.startswith("|") and MEASURED.search(line)]
        assert not rows, f"{doc.relative_to(ROOT)}: table rows with measured numbers outside a generated table: {rows[:3]}"


def test_generated_tables_exist_and_name_their_runs():
    n = 0
    for doc in dt.DOCS:
        for m in dt.BLOCK.finditer(doc.read_text()):
            n += 1
            kind, *args = m.group("spec").split()
            assert kind in dt.KINDS, f"{doc.name}: unknown table kind {kind}"
            for run in [a for a in args if not a.endswith(".json") and (ROOT / "docs/runs" / a).is_dir()]:
                info = json.loads((ROOT / "docs/runs" / run / "run.json").read_text())
                for key in ("command", "commit", "date", "machine", "python", "torch", "transformers"):
                    assert key in info, f"docs/runs/{run}/run.json: no {key}"
    assert n >= 40


def test_transcribed_runs_say_so():
    """A table whose numbers were copied from the logs or docs of their time (its report was never
    committed) comes from docs/runs/<run>/tables.json, and that run's run.json says so."""
    for tables in (ROOT / "docs/runs").glob("*/tables.json"):
        info = json.loads((tables.parent / "run.json").read_text())
        assert info.get("source", "").startswith("transcribed"), f"{tables.parent.name}: run.json has no source"


def test_table_of_a_report_is_the_runs_table_command(capsys):
    """`report RUN` is exactly what `python -m prlhf.runs table docs/runs/RUN/report.json` prints."""
    from prlhf.runs import main

    main(["table", str(ROOT / "docs/runs/tldr_defaults_half2_ulr3e-2/report.json")])
    printed = capsys.readouterr().out
    assert dt.render("report tldr_defaults_half2_ulr3e-2").strip() in printed


RUN_KEYS = ("command", "commit", "date", "machine", "python", "torch", "transformers", "peft", "accelerate", "trl")


def test_every_run_file_says_how_it_was_made():
    """docs/runs/<run>/run.json and the `run` block of every docs/benchmarks/*.json: the command,
    the commit, the date, the machine and the library versions (keys named after the packages)."""
    runs = sorted((ROOT / "docs/runs").glob("*/run.json"))
    assert len(runs) >= 30
    for p in runs:
        info = json.loads(p.read_text())
        missing = [k for k in RUN_KEYS if k not in info]
        assert not missing, f"{p.relative_to(ROOT)}: no {missing}"
        assert info["command"] and re.match(r"\d{4}-\d{2}-\d{2}$", info["date"]), p
        assert {"cpu", "cores", "gpu"} <= set(info["machine"]), p
    for p in sorted((ROOT / "docs/benchmarks").glob("*.json")):
        run = json.loads(p.read_text()).get("run")
        assert run, f"{p.relative_to(ROOT)}: no run block"
        missing = [k for k in RUN_KEYS if k not in run]
        assert not missing, f"{p.relative_to(ROOT)}: run block without {missing}"
