"""Run records (docs/runs/<run>/run.json) and the tables made from a recipe's report.json."""

import json

from prlhf.runs import PACKAGES, main, report_table, run_record


def test_run_record_names_command_commit_date_machine_and_versions(tmp_path):
    rec = run_record("bash recipes/x.sh a b", date="2026-12-01", note="half 2")
    assert rec["command"] == "bash recipes/x.sh a b" and rec["date"] == "2026-12-01" and rec["note"] == "half 2"
    assert rec["commit"] is None or len(rec["commit"].split("+")[0]) == 40
    assert rec["machine"]["cores"] >= 1 and "gpu" in rec["machine"]
    assert rec["python"].count(".") == 2
    for pkg in PACKAGES:
        assert pkg in rec
    assert rec["torch"] is not None and rec["transformers"] is not None
    report = tmp_path / "report.json"
    report.write_text("{}")
    assert main(["record", "--command", "x", "--out", str(tmp_path / "run"), "--copy", str(report), "--seconds", "12"]) == 0
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["command"] == "x" and saved["wall_seconds"] == 12.0 and (tmp_path / "run" / "report.json").is_file()


def test_report_table_has_a_row_per_method_and_the_per_group_columns():
    report = {"methods": {
        "dpo": {"accuracy": {"seen": 0.5, "generic": 0.5, "unseen": 0.75}, "accuracy_ci": {"seen": [0.4, 0.6]},
                "flip_rate": 0.0, "flip_rate_by_group": {"majority": 0.0, "minority": 0.0},
                "accuracy_by_group": {"majority": 0.8, "minority": 0.1}},
        "pdpo": {"accuracy": {"seen": 0.7, "generic": 0.5, "unseen": None}, "flip_rate": 0.25,
                 "flip_rate_by_group": {"majority": 0.1, "minority": 0.6},
                 "accuracy_by_group": {"majority": 0.75, "minority": 0.6},
                 "accuracy_difference": {"vs": "dpo", "seen": {"mean": 0.2, "ci": [0.05, 0.35]}}}}}
    lines = report_table(report).splitlines()
    assert lines[0].startswith("| method | acc seen") and "flip minority" in lines[0] and "acc minority" in lines[0]
    assert lines[2] == ("| dpo | 0.500 [0.40, 0.60] | 0.500 | 0.750 | 0.000 | 0.000 | 0.000 | 0.800 | 0.100 | - |")
    assert lines[3] == ("| pdpo | 0.700 | 0.500 | - | 0.250 | 0.100 | 0.600 | 0.750 | 0.600 | +0.200 [0.05, 0.35] |")


def test_report_table_adds_every_pairwise_difference_when_a_report_has_them():
    d = {"seen": {"mean": -0.05, "ci": [-0.1, 0.0]}, "unseen": None}
    report = {"methods": {
        "dpo": {"accuracy": {"seen": 0.5, "generic": 0.5, "unseen": None}},
        "dpo_user_id": {"accuracy": {"seen": 0.6, "generic": 0.5, "unseen": None}},
        "pdpo": {"accuracy": {"seen": 0.55, "generic": 0.5, "unseen": None},
                 "accuracy_differences": {"dpo": {"seen": {"mean": 0.05, "ci": [0.0, 0.1]}, "unseen": None},
                                          "dpo_user_id": d}}}}
    lines = report_table(report).split("\n\n")[1].splitlines()
    assert lines[0] == "| method | minus | seen (paired) | unseen (paired) |"
    assert lines[2:] == ["| pdpo | dpo | +0.050 [0.00, 0.10] | - |", "| pdpo | dpo_user_id | -0.050 [-0.10, 0.00] | - |"]
    two = {"methods": {k: v for k, v in report["methods"].items() if k != "pdpo"}}
    assert "\n\n" not in report_table(two)  # no pairwise table without the key
