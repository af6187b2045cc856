"""The behavioural metrics: user-match rate (TF-IDF nearest centroid) on hand-made texts whose
assignment is known, and the user-swap flip rate on hand-made margins."""

import json

import pytest

from prlhf.behaviour import NearestCentroidMatcher, build_matcher, flip_rate, load_match_groups, response_text, user_match_rate
from prlhf.report import method_summary

COOKING = ["stir the soup and add salt", "bake the bread in the oven", "chop onions and fry them in butter"]
SPORTS = ["the striker scored a goal", "the team won the match in overtime", "the goalkeeper saved a penalty"]


def train_records():
    return ([{"user_id": "chef", "prompt": "p", "chosen": t, "rejected": "x"} for t in COOKING]
            + [{"user_id": "fan", "prompt": "p", "chosen": [{"role": "assistant", "content": t}], "rejected": "x"}
               for t in SPORTS])


def test_nearest_centroid_assigns_by_vocabulary():
    matcher = build_matcher(train_records())
    assert matcher.labels == ["chef", "fan"]
    assert matcher.predict(["fry the onions in the oven", "a goal in the match", "the team baked bread and soup"]) == \
        ["chef", "fan", "chef"]


def test_user_match_rate_counts_own_user_hits_with_chance_level():
    matcher = build_matcher(train_records())
    gens = [{"user_id": "chef", "response": "add salt to the soup"},      # hit
            {"user_id": "chef", "response": "the striker scored"},        # miss
            {"user_id": "fan", "response": "won the match"},              # hit
            {"user_id": "fan", "response": "penalty saved by the goalkeeper"},  # hit
            {"user_id": None, "response": "bake bread"},                 # generic user: not counted
            {"user_id": "stranger", "response": "a goal"}]               # unknown to the matcher
    m = user_match_rate(matcher, gens)
    assert m["rate"] == pytest.approx(3 / 4) and m["n"] == 4 and m["chance"] == 0.5
    assert m["per_label"] == {"chef": 0.5, "fan": 1.0}
    assert m["assigned_unknown"] == {"chef": 1, "fan": 1}
    assert m["ci"][0] <= 0.75 <= m["ci"][1]
    assert [g["matched"] for g in gens][:2] == ["chef", "fan"]


def test_groups_replace_users_for_matching(tmp_path):
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"users": [{"user_id": "chef", "group": "majority"}, {"user_id": "fan", "group": "minority"},
                                           {"user_id": "cook2", "group": "majority"}]}))
    groups = load_match_groups(users)
    assert groups == {"chef": "majority", "fan": "minority", "cook2": "majority"}
    matcher = build_matcher(train_records(), groups)
    assert matcher.labels == ["majority", "minority"]
    m = user_match_rate(matcher, [{"user_id": "cook2", "response": "fry onions in butter"}], groups)
    assert m["rate"] == 1.0 and m["chance"] == 0.5
    # users.json without groups (e.g. DSP domains): users are matched one by one
    users.write_text(json.dumps({"users": [{"user_id": "chef", "domain": "c"}]}))
    assert load_match_groups(users) == {}


def test_matcher_needs_two_labels():
    with pytest.raises(ValueError, match="at least 2"):
        NearestCentroidMatcher(COOKING, ["chef"] * 3)


def test_response_text_of_messages():
    assert response_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "a\nb"
    assert response_text("plain") == "plain"


def test_flip_rate_counts_sign_changes_against_the_generic_user_by_hand():
    pairs = [{"user_id": "u1", "margin": 1.0, "generic_margin": -0.5},   # flips
             {"user_id": "u1", "margin": 2.0, "generic_margin": 0.1},    # same sign
             {"user_id": "u2", "margin": -1.0, "generic_margin": -3.0},  # same sign
             {"user_id": "u2", "margin": 0.0, "generic_margin": 1.0},    # tie vs win: flips
             {"user_id": "x", "margin": 1.0}]                            # unseen: no generic margin
    f = flip_rate(pairs, {"u1": "majority", "u2": "minority"})
    assert f["rate"] == 0.5 and f["n"] == 4
    assert f["per_group"] == {"majority": 0.5, "minority": 0.5}


def test_method_summary_of_a_model_that_ignores_users():
    metrics = {"accuracy": {"seen": 1.0, "generic": 1.0, "unseen": None, "ci": {"seen": [1, 1], "generic": [1, 1], "unseen": None},
                            "per_user_mean": {"seen": {"mean": 1.0}, "unseen": {"mean": None}}},
               "n": {"seen": 2, "unseen": 0}}
    pairs = [{"user_id": "chef", "margin": 0.3, "generic_margin": 0.3}, {"user_id": "fan", "margin": 0.2, "generic_margin": 0.2}]
    gen = {"length": {"all": 3.0}, "length_ci": {"all": [3.0, 3.0]},
           "generations": [{"user_id": "chef", "response": "bake bread"}, {"user_id": "fan", "response": "bake bread"}]}
    s = method_summary(metrics, pairs, gen, {}, build_matcher(train_records()), {})
    assert s["flip_rate"] == 0.0
    assert s["user_match"] == 0.5 and s["user_match_chance"] == 0.5  # the same text for both users: one of two
    assert s["n_pairs"] == {"seen": 2, "unseen": 0}
