"""The demo pipeline end to end at toy size (the full demo runs in the README's first command), and
`prlhf eval` comparing two saved models with generation and a report."""

import json

from prlhf.cli import main
from prlhf.experiments.demo import check_findings, run_demo


def test_demo_pipeline_writes_the_report_contract(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, seed=0, n_users=4, unseen_users=2, pairs_per_user=8, n_prompts=20, generate_per_user=1,
                      methods=["dpo", "pdpo_individual"], sft_epochs=1, num_train_epochs=1, logging_steps=1)
    shown = capsys.readouterr()
    # progress bars and one table, not a printed dictionary per log step
    assert "rewards/accuracies_user" not in shown.out + shown.err and "{'loss'" not in shown.out + shown.err
    assert "| method |" in shown.out
    saved = json.loads((out / "report.json").read_text())
    assert saved["runtime_seconds"] > 0 and 0 < saved["majority_share"] <= 1
    assert set(saved["methods"]) == {"sft", "dpo", "pdpo_individual"}
    for m in saved["methods"].values():
        assert set(m["accuracy"]) >= {"seen", "generic", "unseen"}
        assert set(m["length"]) >= {"majority", "unseen"}
    assert saved["methods"]["sft"]["accuracy"]["seen"] == 0.5  # the reference against itself: all ties
    for name in ("report.md", "lengths.png", "accuracy_per_user.png", "generations.jsonl"):
        assert (out / name).is_file(), name
    assert "| method |" in (out / "report.md").read_text()
    # the cold-start contract: new users' learning curves, seen and text-only accuracy
    cs = saved["cold_start"]
    assert isinstance(cs["seen_accuracy"], float) and isinstance(cs["text_only_accuracy"], float)
    assert set(cs["curves"]) == {"individual"}  # the cluster model was not trained in this run
    for strategy in ("random", "active"):
        curve = cs["curves"]["individual"][strategy]
        assert set(curve) == {"0", "1", "2", "4", "8", "16", "32"} and all(0 <= v <= 1 for v in curve.values())
    assert cs["curves"]["individual"]["random"]["0"] == cs["curves"]["individual"]["active"]["0"]  # both: the generic user
    assert (out / "cold_start.png").is_file() and "## New users (cold start)" in (out / "report.md").read_text()
    texts = [json.loads(line)["user_text"] for line in (out / "data_text" / "unseen.jsonl").read_text().splitlines()]
    assert all(texts) and not any(json.loads(line)["user_text"] for line in (out / "data" / "train.jsonl").read_text().splitlines())
    findings = check_findings(report)
    assert set(findings) >= {"dpo: seen accuracy within 0.10 of majority_share", "runtime <= 600 s"}
    assert all(isinstance(v, bool) for v in findings.values())
    assert findings["runtime <= 600 s"] is True  # this toy run takes seconds
    # each finding is its stated comparison of the report's numbers (checked here independently)
    m = report["methods"]
    assert findings["dpo: seen accuracy within 0.10 of majority_share"] == (
        abs(m["dpo"]["accuracy"]["seen"] - report["majority_share"]) <= 0.10)
    assert findings["pdpo_individual: seen accuracy >= 0.90"] == (m["pdpo_individual"]["accuracy"]["seen"] >= 0.90)
    bad = dict(report, methods={**m, "pdpo_individual": {**m["pdpo_individual"],
                                                          "accuracy": {**m["pdpo_individual"]["accuracy"], "seen": 0.5}}})
    assert check_findings(bad)["pdpo_individual: seen accuracy >= 0.90"] is False

    data = out / "data"
    assert main(["eval", "--model", str(out / "dpo"), "--model", str(out / "pdpo_individual"),
                 "--data", str(data / "test.jsonl"), str(data / "unseen.jsonl"), "--users", str(data / "users.json"),
                 "--generate", "1", "--max-new-tokens", "8", "--report", str(tmp_path / "cmp"),
                 "--output", str(tmp_path / "m.json")]) == 0
    both = json.loads((tmp_path / "m.json").read_text())["models"]
    assert set(both) == {"dpo", "pdpo_individual"}
    assert both["pdpo_individual"]["accuracy"]["seen"] == saved["methods"]["pdpo_individual"]["accuracy"]["seen"]
    assert set(both["dpo"]["generation"]["length"]) >= {"majority", "unseen"}
    assert (tmp_path / "cmp" / "report.md").is_file() and (tmp_path / "cmp" / "lengths.png").is_file()
