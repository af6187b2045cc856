"""The training-time health signal and the defaults from evidence: held-out pairs of the training
users are evaluated during training (seen / generic accuracy, user-swap flip rate, per group), and
a run whose users do not separate says so once; a run that separates stays silent."""

import json
from collections import Counter

import pytest
from conftest import two_user_records

from prlhf.config import FULL_LEARNING_RATE, LORA_LEARNING_RATE, USER_LEARNING_RATE, PDPOConfig, PRMConfig
from prlhf.data import hold_out_pairs
from prlhf.trainers.pdpo import PDPOTrainer

WARNING = "users are not separating"


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=8, learning_rate=1e-3, n_user_tokens=4, save_strategy="no",
                logging_steps=1, train_sampling_strategy="random", weight_decay=0.0, num_train_epochs=4)
    base.update(kw)
    return PDPOConfig(**base)


def majority_records():
    """Two users prefer long answers, one short ones, on the same prompts: a shared LLM learns 'long'."""
    return two_user_records(n_prompts=16, users=("long_a", "long_b", "short_c"))


def users_json(tmp_path, groups):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"users": [{"user_id": u, "group": g} for u, g in groups.items()]}))
    return path


# -- defaults ---------------------------------------------------------------------------------

def test_defaults_are_the_measured_settings_and_follow_use_lora(tmp_path):
    a = PDPOConfig(output_dir=str(tmp_path))
    assert a.user_offset_init == "vocab" and a.user_learning_rate == USER_LEARNING_RATE == 3e-2
    assert str(getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)) == "constant"
    assert a.learning_rate == FULL_LEARNING_RATE
    assert PDPOConfig(output_dir=str(tmp_path), use_lora=True).learning_rate == LORA_LEARNING_RATE == 5e-4
    assert PDPOConfig(output_dir=str(tmp_path), use_lora=True, learning_rate=1e-4).learning_rate == 1e-4  # given wins
    rm = PRMConfig(output_dir=str(tmp_path), use_lora=True)
    assert rm.learning_rate == 5e-4 and rm.user_position == "after_response" and rm.user_learning_rate == 1e-2
    # the health signal turns evaluation on (every quarter of the run) when there is no eval file ...
    assert str(a.eval_strategy.value) == "steps" and a.eval_steps == 0.25
    # ... but not for vanilla DPO, nor when switched off
    assert str(PDPOConfig(output_dir=str(tmp_path), user_model="none").eval_strategy.value) == "no"
    assert str(PDPOConfig(output_dir=str(tmp_path), health_eval_pairs=0).eval_strategy.value) == "no"
    with pytest.raises(ValueError, match="health_eval_pairs"):
        PDPOConfig(output_dir=str(tmp_path), health_eval_pairs=-1)


def test_effective_settings_are_saved_with_the_model(tmp_path):
    a = args(tmp_path, max_steps=1, use_lora=True, lora_r=2, learning_rate=None, health_eval_pairs=0)
    trainer = PDPOTrainer(args=a, train_dataset=two_user_records(n_prompts=4))
    trainer.train()
    trainer.save_model()
    saved = json.loads((tmp_path / "out" / "training_args.json").read_text())
    assert saved["learning_rate"] == 5e-4 and saved["user_learning_rate"] == 3e-2
    assert saved["user_offset_init"] == "vocab" and saved["lr_scheduler_type"] == "constant"
    card = (tmp_path / "out" / "README.md").read_text()
    for line in ("user_offset_init", "vocab", "lr_scheduler_type", "constant", "0.0005"):
        assert line in card, line


# -- the held-out slice --------------------------------------------------------------------------

def test_hold_out_pairs_spreads_over_users_and_keeps_most_of_each_users_data():
    records = majority_records() + [{"user_id": None, "prompt": "Q: x\nA:", "chosen": " a", "rejected": " b"}] * 4
    kept, held = hold_out_pairs(records, 9, seed=0)
    assert len(held) == 9 and len(kept) == len(records) - 9
    assert Counter(r["user_id"] for r in held) == {"long_a": 3, "long_b": 3, "short_c": 3}
    assert all(r["user_id"] is not None for r in held)
    # at most a quarter of any user's 16 pairs, however many are asked for
    _, most = hold_out_pairs(records, 1000, seed=0)
    assert Counter(r["user_id"] for r in most) == {"long_a": 4, "long_b": 4, "short_c": 4}
    assert hold_out_pairs(records, 9, seed=0) == (kept, held)  # seeded
    assert kept == [r for r in records if not any(r is h for h in held)]


# -- the signal ----------------------------------------------------------------------------------

def test_health_metrics_count_flips_per_pair_and_group(tmp_path):
    trainer = PDPOTrainer(args=args(tmp_path, max_steps=1, users_file=str(users_json(
        tmp_path, {"long_a": "majority", "long_b": "majority", "short_c": "minority"}))),
        train_dataset=majority_records())
    reg = trainer.model.registry
    row = {u: reg.ids.index(u) + 1 for u in reg.ids}
    # (row, user-term hit, generic-term hit): 2 of 3 majority pairs agree, the minority's 2 pairs both flip
    trainer._eval_pairs = [(row["long_a"], 1.0, 1.0), (row["long_b"], 0.0, 1.0), (row["long_a"], 1.0, 1.0),
                           (row["short_c"], 1.0, 0.0), (row["short_c"], 1.0, 0.0), (0, 1.0, 0.0)]
    m = trainer._health_metrics()
    assert m["eval_rewards/accuracies"] == pytest.approx(4 / 5)  # the generic user's own pair (row 0) is left out
    assert m["eval_rewards/accuracies_generic"] == pytest.approx(3 / 5)
    assert m["eval_flip_rate"] == pytest.approx(3 / 5)
    assert m["eval_flip_rate/majority"] == pytest.approx(1 / 3) and m["eval_flip_rate/minority"] == 1.0


def _train(tmp_path, **kw):
    path = users_json(tmp_path, {"long_a": "majority", "long_b": "majority", "short_c": "minority"})
    trainer = PDPOTrainer(args=args(tmp_path, users_file=str(path), **kw), train_dataset=majority_records())
    trainer.train()
    trainer.save_state()
    evals = [e for e in trainer.state.log_history if "eval_flip_rate" in e]
    return trainer, evals, json.loads((tmp_path / "out" / "trainer_state.json").read_text())


def test_warning_fires_on_a_run_built_to_collapse(tmp_path, capsys):
    """Zero offsets and a user learning rate of 0: every user IS the generic user, so nothing flips,
    while the shared LLM learns the majority's preference."""
    trainer, evals, state = _train(tmp_path, user_offset_init="zero", user_learning_rate=0.0)
    assert len(evals) == 4 and {e["eval_flip_rate"] for e in evals} == {0.0}  # every quarter of the run
    assert all("eval_rewards/accuracies_generic" in e and "eval_flip_rate/minority" in e for e in evals)
    assert trainer.health_warning is not None and WARNING in trainer.health_warning
    assert "user_learning_rate is 0:" in trainer.health_warning and "user_offset_init is 'zero'" in trainer.health_warning
    assert "lr_scheduler_type" not in trainer.health_warning  # constant: not a cause here
    assert capsys.readouterr().err.count(WARNING) == 1  # once, not at every evaluation
    warned = [e["step"] for e in state["log_history"] if "health_warning" in e]
    assert len(warned) == 1 and warned[0] in [e["step"] for e in evals] and warned[0] >= 0.25 * trainer.state.max_steps
    assert any("eval_flip_rate" in e for e in state["log_history"])  # kept in trainer_state.json


def test_no_warning_on_a_run_that_separates(tmp_path, capsys):
    trainer, evals, state = _train(tmp_path)  # the defaults: vocab offsets, user learning rate 1e-2
    assert trainer.health_warning is None and WARNING not in capsys.readouterr().err
    assert not any("health_warning" in e for e in state["log_history"])
    assert max(e["eval_flip_rate/minority"] for e in evals) > 0.3


def test_reward_model_training_has_the_health_signal_too(tmp_path):
    from prlhf.trainers.prm import PRMTrainer

    path = users_json(tmp_path, {"long_a": "majority", "long_b": "majority", "short_c": "minority"})
    a = PRMConfig(output_dir=str(tmp_path / "rm"), report_to="none", use_cpu=True, disable_tqdm=True,
                  per_device_train_batch_size=8, learning_rate=1e-3, n_user_tokens=2, save_strategy="no",
                  logging_steps=1, max_steps=4, model_name_or_path="tiny-llama", users_file=str(path))
    trainer = PRMTrainer(args=a, train_dataset=majority_records())
    assert len(trainer.eval_dataset) == 12  # a quarter of each user's 16 pairs, at most 32 in all
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_flip_rate" in e]
    assert len(evals) == 4
    assert {"eval_rewards/accuracies", "eval_rewards/accuracies_generic", "eval_flip_rate/minority"} <= set(evals[-1])


def test_health_findings_by_hand():
    from prlhf.health import health_findings

    logs = {"eval_rewards/accuracies": 0.55, "eval_rewards/accuracies_generic": 0.60, "eval_flip_rate": 0.2,
            "eval_flip_rate/majority": 0.15, "eval_flip_rate/minority": 0.3}
    # before a quarter of the run: nothing is judged
    assert health_findings(10, 60, {**logs, "eval_flip_rate/minority": 0.0, "eval_flip_rate/majority": 0.0}, [0.5, 0.9]) == []
    # a quarter: flips in every group under 0.05 while training accuracy rises
    quiet = {**logs, "eval_flip_rate": 0.02, "eval_flip_rate/majority": 0.0, "eval_flip_rate/minority": 0.04}
    assert [k for k, _ in health_findings(15, 60, quiet, [0.5, 0.7])] == ["not_separating"]
    assert health_findings(15, 60, quiet, [0.5, 0.52]) == []  # training accuracy not rising: nothing learned yet
    # flips, but the users' own embeddings do no better than the generic user: from half of the run on
    assert health_findings(15, 60, logs, [0.5, 0.7]) == []
    (kind, msg), = health_findings(30, 60, logs, [0.5, 0.7])
    assert kind == "not_separating" and "0.55" in msg and "0.60" in msg
    # memorizing: training 0.95 against 0.55 held out
    assert [k for k, _ in health_findings(30, 60, {**logs, "eval_rewards/accuracies_generic": 0.5}, [0.5, 0.95, 0.95, 0.95])] \
        == ["memorizing"]
