"""The policy-or-reward-model table's own arithmetic: training seconds per pair from a saved folder's
trainer state, and the table's rows (the end-to-end run is tests/test_recipes.py)."""

import json

import pytest

from prlhf.experiments.policy_or_rm import report_table, training_cost


def test_training_cost_is_runtime_over_the_pairs_the_steps_saw(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({
        "global_step": 60, "train_batch_size": 8,
        "log_history": [{"loss": 0.7, "step": 10}, {"step": 60, "train_runtime": 815.4}]}))
    (tmp_path / "training_args.json").write_text(json.dumps({"per_device_train_batch_size": 8,
                                                              "gradient_accumulation_steps": 2}))
    cost = training_cost(tmp_path)
    assert cost["pairs"] == 60 * 8 * 2
    assert cost["seconds_per_pair"] == pytest.approx(815.4 / 960)
    assert training_cost(tmp_path / "missing") is None


def test_report_table_has_one_row_per_model_and_the_users_as_columns():
    report = {"methods": {
        "pdpo": {"kind": "policy (implicit reward)", "accuracy": {"seen": 0.75}, "accuracy_ci": {"seen": [0.6, 0.9]},
                 "accuracy_per_user": {"a": 0.5, "b": 1.0}, "training": {"seconds_per_pair": 1.7},
                 "generation": {"how": "greedy, for the user", "user_match": 0.5, "user_match_ci": [0.2, 0.8],
                                "seconds_per_answer": 0.4}},
        "sampler (x), greedy": {"kind": "sampler (no user)",
                                "generation": {"how": "greedy, the same for every user", "user_match": 0.25,
                                               "user_match_ci": None, "seconds_per_answer": 0.3}}},
        "user_match_chance": 0.25, "user_match_data": 0.9, "prompts": 16, "prompts_per_user": 8,
        "max_new_tokens": 48, "best_of": 8, "temperature": 1.0}
    table = report_table(report)
    lines = table.splitlines()
    assert lines[0] == ("| model | kind | acc seen | acc a | acc b | train s/pair | answers | user match | s/answer |")
    assert lines[2] == ("| pdpo | policy (implicit reward) | 0.750 [0.60, 0.90] | 0.500 | 1.000 | 1.70 | "
                        "greedy, for the user | 0.500 [0.20, 0.80] | 0.40 |")
    assert lines[3].startswith("| sampler (x), greedy | sampler (no user) | - | - | - | - |")
