"""Evaluation arithmetic on hand-made inputs: scores, bootstrap intervals, per-user means, grouping."""

import pytest

from prlhf.evaluation import group_of, held_out_prompts, shared_prompts
from prlhf.report import comparison_table
from prlhf.stats import bootstrap_ci, pair_score, per_user_mean


def test_score_counts_ties_as_half():
    assert [pair_score(1e-9), pair_score(-2.0), pair_score(0.0)] == [1.0, 0.0, 0.5]


def test_bootstrap_ci_hand_cases():
    assert bootstrap_ci([0.7] * 10) == [pytest.approx(0.7), pytest.approx(0.7)]  # no spread, no interval
    assert bootstrap_ci([]) is None
    values = [1.0] * 70 + [0.0] * 30
    lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
    # the mean 0.7 with standard error sqrt(0.21 / 100) = 0.046: a 95% interval of about +-0.09
    assert 0.58 < lo < 0.65 and 0.75 < hi < 0.82
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)  # seeded


def test_per_user_mean_weighs_users_equally():
    groups = {"a": [1.0] * 9 + [0.0], "b": [0.0, 0.0]}  # a: 0.9 over 10 pairs, b: 0.0 over 2
    out = per_user_mean(groups)
    assert out["mean"] == pytest.approx(0.45) and out["n_users"] == 2  # per sample it would be 0.75
    lo, hi = out["ci"]
    assert lo == pytest.approx(0.0) and hi == pytest.approx(0.9)  # resampling 2 users: 0, 0.45 or 0.9


class _Registry:
    def __init__(self, ids):
        self.ids = ids

    def __contains__(self, u):
        return u in self.ids


class _Model:
    def __init__(self, ids):
        self.registry = _Registry(ids)


def test_group_of_serves_unknown_and_untrained_users_as_unseen():
    model, groups = _Model(["a", "b"]), {"a": "majority", "b": "minority", "z": "majority"}
    assert group_of("a", model, groups) == "majority" and group_of("b", model, groups) == "minority"
    assert group_of("z", model, groups) == "unseen"  # not trained on: served by the generic user
    assert group_of(None, model, groups) == "unseen"


def test_held_out_prompts_are_distinct_per_user():
    recs = [{"user_id": "a", "prompt": p, "chosen": "x", "rejected": "y"} for p in ["p1", "p1", "p2", "p3"]]
    recs += [{"user_id": "b", "prompt": "p1", "chosen": "x", "rejected": "y"}]
    items = held_out_prompts(recs, n_per_user=2)
    assert [u for u, _, _ in items] == ["a", "a", "b"]
    assert len({p for u, p, _ in items if u == "a"}) == 2


def test_shared_prompts_give_every_user_the_same_posts():
    recs = [{"user_id": u, "prompt": p, "chosen": "x", "rejected": "y", **({"user_text": "t"} if u == "b" else {})}
            for u, ps in (("a", ["p1", "p2"]), ("b", ["p3"]), (None, ["p4", "p1"])) for p in ps]
    items = shared_prompts(recs, 3, seed=1)
    assert [u for u, _, _ in items] == ["a"] * 3 + ["b"] * 3 + [None] * 3  # users in order, the generic last
    per_user = {u: [p for v, p, _ in items if v == u] for u in ("a", "b", None)}
    assert per_user["a"] == per_user["b"] == per_user[None] and len(set(per_user["a"])) == 3
    assert set(per_user["a"]) <= {"p1", "p2", "p3", "p4"}
    assert {t for u, _, t in items if u == "b"} == {"t"} and {t for u, _, t in items if u == "a"} == {None}
    assert shared_prompts(recs, 3, seed=1) == items  # seeded
    assert len(shared_prompts(recs, 10)) == 3 * 4  # at most the distinct prompts there are


def test_generation_runs_each_served_user_and_prompt_once():
    """Greedy decoding: unknown users (all served by e_0) on the same prompt get one generation, copied."""
    from prlhf.evaluation import evaluate_generation

    class Recorder(_Model):
        calls: list = []

        def generate(self, prompts, user_ids, user_texts, **kwargs):
            assert kwargs["do_sample"] is False
            self.calls += list(zip(prompts, user_ids))
            return [f"{p} for {u}" for p, u in zip(prompts, user_ids)]

    recs = [{"user_id": u, "prompt": p, "chosen": "x", "rejected": "y"} for u in ("a", "new1", "new2") for p in ("p1", "p2")]
    model = Recorder(["a"])
    gen = evaluate_generation(model, recs, n_per_user=2, groups={"a": "majority"}, prompts="shared", batch_size=3)
    assert sorted(model.calls) == [("p1", "a"), ("p1", "new1"), ("p2", "a"), ("p2", "new1")]  # new2 shares new1's
    assert len(gen["generations"]) == 6 and gen["n_generations"] == {"majority": 2, "unseen": 4}
    by = {(g["user_id"], g["prompt"]): g["response"] for g in gen["generations"]}
    assert by[("new2", "p1")] == by[("new1", "p1")] == "p1 for new1" and by[("a", "p2")] == "p2 for a"
    # the prompt baseline writes each id into the prompt: unknown users are not served alike there
    model = Recorder(["a"])
    model.calls = []
    model.prlhf_config = type("Cfg", (), {"user_id_prompt": "[user: {user_id}]\n"})()
    evaluate_generation(model, recs, n_per_user=2, prompts="shared")
    assert len(model.calls) == 6


def test_comparison_table_lists_methods_and_groups():
    table = comparison_table({"dpo": {"accuracy": {"seen": 0.7, "generic": 0.7, "unseen": None},
                                      "accuracy_ci": {"seen": [0.6, 0.8]}, "length": {"majority": 30.0, "unseen": 29.0}},
                              "pdpo": {"accuracy": {"seen": 1.0}, "length": {"minority": 4.0}}})
    lines = table.splitlines()
    assert lines[0] == "| method | acc seen | acc generic | acc unseen | words majority | words minority | words unseen |"
    assert lines[2] == "| dpo | 0.700 [0.60, 0.80] | 0.700 | - | 30.0 | - | 29.0 |"
    assert lines[3].startswith("| pdpo | 1.000 |")


def test_models_with_the_same_reference_share_its_scores():
    """Two models from one base (vanilla and personalized, LoRA): the shared reference cache gives
    the same accuracies as scoring each alone, and the second model adds no reference entries."""
    from conftest import build_model, two_user_records

    from prlhf.evaluation import evaluate_accuracy
    from prlhf.reference import reference_identity

    records = two_user_records(n_prompts=3, users=("a", "b"))
    plain = build_model("none", users=("a", "b"), use_lora=True)
    personal = build_model("individual", users=("a", "b"), use_lora=True)
    assert reference_identity(plain) == reference_identity(personal)
    alone = [evaluate_accuracy(m, records, None, max_length=64) for m in (plain, personal)]
    cache: dict = {}
    shared = [evaluate_accuracy(m, records, None, max_length=64, ref_cache=cache) for m in (plain, personal)]
    assert len(cache) == len(records)
    for a, b in zip(alone, shared):
        assert [p["margin"] for p in a["pairs"]] == pytest.approx([p["margin"] for p in b["pairs"]], abs=1e-5)
    baseline = build_model("none", users=("a", "b"), use_lora=True, user_id_prompt="[user: {user_id}]\n")
    assert reference_identity(baseline) != reference_identity(plain)  # other prompts: other reference scores


def test_paired_difference_by_hand():
    from prlhf.stats import paired_difference

    base = [{"index": i, "seen": True, "correct": c} for i, c in enumerate([1.0, 0.0, 0.0, 1.0])]
    base.append({"index": 9, "seen": False, "correct": 0.0})
    model = [{"index": i, "seen": True, "correct": c} for i, c in enumerate([1.0, 1.0, 0.5, 1.0])]
    model.append({"index": 9, "seen": False, "correct": 1.0})
    d = paired_difference(model, base)
    assert d["mean"] == pytest.approx((0 + 1 + 0.5 + 0) / 4) and d["n"] == 4
    assert 0.0 <= d["ci"][0] <= d["mean"] <= d["ci"][1] <= 1.0  # every pair gains or ties: the interval is >= 0
    assert paired_difference(model, base, "unseen")["mean"] == 1.0
    assert paired_difference(model, [], "seen") is None
