"""A new user on a trained model (prlhf.experiments.new_user): the curve, the fully trained user and
the prompt baseline on the same held-out pairs, the gap-closed share against a hand computation."""

import json

import numpy as np
import pytest
from conftest import two_user_records

from prlhf.config import PDPOConfig
from prlhf.experiments.new_user import gap_closed, main, report_table
from prlhf.trainers.pdpo import PDPOTrainer


def test_gap_closed_is_the_share_of_the_way_with_a_paired_interval():
    zero = [0, 0, 1, 0, 1, 0, 0, 1]  # 0.375
    full = [1, 1, 1, 1, 1, 0, 1, 1]  # 0.875
    k = [1, 0, 1, 1, 1, 0, 0, 1]     # 0.625: half of the 0.5 gap
    g = gap_closed(k, zero, full, n_boot=2000)
    assert g["mean"] == pytest.approx((0.625 - 0.375) / (0.875 - 0.375))
    assert g["ci"][0] <= g["mean"] <= g["ci"][1]
    assert gap_closed(k, zero, zero)["mean"] is None  # no gap to close


def _train(records, out, **kw):
    args = PDPOConfig(output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=8,
                      learning_rate=1e-3, user_learning_rate=3e-2, n_user_tokens=2, num_train_epochs=2, save_strategy="no",
                      logging_steps=100, reference_model_name_or_path="tiny-llama", weight_decay=0.0, max_length=64,
                      max_prompt_length=32, health_eval_pairs=0, **kw)
    trainer = PDPOTrainer(args=args, train_dataset=records)
    trainer.train()
    trainer.save_model()
    return str(out)


def test_new_user_report_on_tiny_models(tmp_path):
    known = two_user_records(n_prompts=12)
    zoe = [dict(r, user_id="zoe") for r in two_user_records(n_prompts=12, seed=1) if r["user_id"] == "short_fan"]
    held_prompts = {json.dumps(r["prompt"]) for r in zoe[:4]}
    pool = [r for r in zoe if json.dumps(r["prompt"]) not in held_prompts]
    data = tmp_path / "data"
    data.mkdir()
    (data / "unseen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in zoe))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in zoe[:4]))
    without = _train(known, tmp_path / "without", user_model="individual")
    full = _train(known + pool, tmp_path / "full", user_model="individual")
    baseline = _train(known, tmp_path / "baseline", user_model="none", user_id_in_prompt=True)
    out = tmp_path / "report"
    assert main(["--model", without, "--full-model", full, "--baseline", baseline, "--new-users", str(data / "unseen.jsonl"),
                 "--held-out-prompts", str(data / "test.jsonl"), "--ks", "0,2,4", "--steps", "3", "--batch-size", "4",
                 "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    nu = report["new_user"]
    assert nu["users"] == ["zoe"] and nu["held_out_pairs"] == 4 and nu["pool_pairs"] == {"zoe": 8}
    assert set(nu["accuracy_by_k"]) == {"0", "2", "4"} == set(nu["accuracy_by_k_active"])
    assert set(report["baseline"]["accuracy_by_k"]) == {"0", "2", "4"}
    for acc in [*nu["accuracy_by_k"].values(), nu["fully_trained_accuracy"], *report["baseline"]["accuracy_by_k"].values()]:
        assert 0.0 <= acc <= 1.0 and acc * 4 == pytest.approx(round(acc * 4))  # 4 pairs: quarters
    for k, g in nu["gap_closed"].items():  # the share agrees with the accuracies it is made of
        gap = nu["fully_trained_accuracy"] - nu["generic_accuracy"]
        if abs(gap) > 1e-9:
            assert g["mean"] == pytest.approx((nu["accuracy_by_k"][k] - nu["generic_accuracy"]) / gap)
    assert "| k | adapted, random |" in report_table(report) and (out / "report.md").is_file() and (out / "new_user.png").is_file()
    assert np.isfinite(report["runtime_seconds"])


def test_new_users_must_be_new(tmp_path):
    known = two_user_records(n_prompts=6)
    model = _train(known, tmp_path / "m", user_model="individual")
    (tmp_path / "u.jsonl").write_text("".join(json.dumps(r) + "\n" for r in known))
    with pytest.raises(ValueError, match="known to"):
        main(["--model", model, "--full-model", model, "--new-users", str(tmp_path / "u.jsonl"),
              "--held-out-prompts", str(tmp_path / "u.jsonl"), "--output", str(tmp_path / "o")])
