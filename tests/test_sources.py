"""Converters, synthetic generator and inspector: counts, labels, splits, on fixtures and ../shared/data."""

import json

import pytest
from fixtures import SHARED, dsp_rows, prism_folder, psoups_files, tldr_rows, write_jsonl

from prlhf.cli import main
from prlhf.data import DataError, load_preference_data
from prlhf.inspection import inspect_pairs
from prlhf.sources import convert_dsp, convert_prism, convert_psoups, convert_tldr, synthesize, write_conversion


def words(text):
    return len(text.split())


def check_common(conv):
    """Invariants of every conversion: valid canonical records; no user on both sides of the split;
    per-user counts add up."""
    seen = {u for u, i in conv.users.items() if i["seen"]}
    assert {r["user_id"] for r in conv.train + conv.test} <= seen
    assert not {r["user_id"] for r in conv.unseen} & seen
    for part in (conv.train, conv.test, conv.unseen):
        if part:
            load_preference_data(part)  # validates every record
    assert sum(i["n_pairs"] for i in conv.users.values()) == conv.written


def split_ids(conv):
    return [[json.dumps(r, sort_keys=True) for r in part] for part in (conv.train, conv.test, conv.unseen)]


# -- tldr --------------------------------------------------------------------------------------


def test_tldr_human_labels_keep_the_workers_choice_and_the_top_k_workers_seen(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    conv = convert_tldr(str(path), label="human", top_k=2, test_fraction=0.3, seed=1)
    check_common(conv)
    assert conv.read == 17 and conv.skipped == {"identical summaries": 1}
    assert conv.written == 16
    assert {u for u, i in conv.users.items() if i["seen"]} == {"w0", "w1"}  # the two most frequent workers
    assert conv.users["w0"]["n_pairs"] == 6 and conv.users["w5"]["n_pairs"] == 1
    rows = tldr_rows()
    for rec in conv.train + conv.test + conv.unseen:
        assert rec["prompt"].startswith("SUBREDDIT: r/relationships\nTITLE: Title ") and rec["prompt"].endswith("TL;DR:")
        assert rec["worker_choice_agrees"] is True
    # chosen is the worker's choice
    first = next(r for r in conv.train + conv.test if r["post_id"] == "t3_0" and r["user_id"] == "w0")
    assert first["chosen"] == rows[0]["summaries"][rows[0]["choice"]]["text"]


def test_tldr_length_labels_follow_each_users_preference(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    conv = convert_tldr(str(path), label="length", long_share=0.7, top_k=2, test_fraction=0.3, seed=3)
    check_common(conv)
    assert conv.skipped == {"identical summaries": 1, "equal-length summaries (words)": 1}
    prefs = {u: i["preference"] for u, i in conv.users.items()}
    seen = [u for u, i in conv.users.items() if i["seen"]]
    unseen = [u for u, i in conv.users.items() if not i["seen"]]
    assert sorted(prefs[u] for u in seen) == ["long", "short"]  # round(0.7 * 2) = 1 long
    assert sorted(prefs[u] for u in unseen) == ["long", "long", "long", "short"]  # round(0.7 * 4) = 3
    for rec in conv.train + conv.test + conv.unseen:
        if prefs[rec["user_id"]] == "long":
            assert words(rec["chosen"]) > words(rec["rejected"])
        else:
            assert words(rec["chosen"]) < words(rec["rejected"])
    assert all(i["group"] == ("majority" if i["preference"] == "long" else "minority") for i in conv.users.values())


def test_tldr_pooled_users_keep_each_workers_preference(tmp_path):
    """--pool-users: seen workers merged into pools of their own preference, balanced by pair count;
    every pair keeps the label its worker's preference gives; unseen workers untouched."""
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    plain = convert_tldr(str(path), label="length", long_share=0.5, top_k=4, test_fraction=0.3, seed=3)
    conv = convert_tldr(str(path), label="length", long_share=0.5, top_k=4, test_fraction=0.3, seed=3, pool_users=2)
    check_common(conv)
    pools = {u: i for u, i in conv.users.items() if i["seen"]}
    assert sorted(pools) == ["long_1", "short_1"]  # round(0.5 * 2) = 1 long pool, 1 short
    for name, info in pools.items():
        assert all(plain.users[w]["preference"] == info["preference"] for w in info["workers"])
        assert info["n_pairs"] == sum(plain.users[w]["n_pairs"] for w in info["workers"])
    assert sorted(w for i in pools.values() for w in i["workers"]) == sorted(u for u, i in plain.users.items() if i["seen"])
    assert [u for u, i in conv.users.items() if not i["seen"]] == [u for u, i in plain.users.items() if not i["seen"]]
    pool_of = {w: name for name, i in pools.items() for w in i["workers"]}
    by_worker = {(r["worker"], r["post_id"], r["chosen"]): r for r in plain.train + plain.test}
    for rec in conv.train + conv.test:
        assert rec["user_id"] == pool_of[rec["worker"]]
        assert (rec["worker"], rec["post_id"], rec["chosen"]) in by_worker  # same label as without pooling
    assert split_ids(conv) and len(conv.train) + len(conv.test) == len(plain.train) + len(plain.test)


def test_tldr_pooling_needs_length_labels_and_enough_pools(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    with pytest.raises(ValueError, match="pool_users needs label='length'"):
        convert_tldr(str(path), label="human", pool_users=2)
    with pytest.raises(ValueError, match="no pool for"):
        convert_tldr(str(path), label="length", long_share=0.7, top_k=4, pool_users=1, seed=3)


def test_tldr_splits_are_stable_and_seeded(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    a = convert_tldr(str(path), label="length", top_k=3, test_fraction=0.3, seed=5)
    b = convert_tldr(str(path), label="length", top_k=3, test_fraction=0.3, seed=5)
    assert split_ids(a) == split_ids(b)
    assert {u: i["preference"] for u, i in a.users.items()} == {u: i["preference"] for u, i in b.users.items()}
    test_posts = {r["post_id"] for r in a.test}
    assert not test_posts & {r["post_id"] for r in a.train}  # held out by post


def test_tldr_worker_halves_are_disjoint_alike_and_cover_every_worker(tmp_path):
    from prlhf.sources.tldr import worker_halves

    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())  # w0 6 rows, w1 5, w2 3, w3..w5 1 each
    one, two = worker_halves(tldr_rows())
    assert one == {"w0", "w2", "w4"} and two == {"w1", "w3", "w5"}  # ranked by count, ties by id, alternately
    halves = [convert_tldr(str(path), label="length", top_k=None, seed=0, worker_half=h) for h in (1, 2)]
    workers = [{r["worker"] for r in c.train + c.test + c.unseen} for c in halves]
    assert workers[0] <= one and workers[1] <= two and not workers[0] & workers[1]
    assert halves[0].skipped["worker in the other half (--worker-half 1)"] == 5 + 1 + 1  # w1's rows, w3, w5
    assert halves[0].options["worker_half"] == 1
    with pytest.raises(ValueError, match="worker_half must be 1 or 2"):
        convert_tldr(str(path), worker_half=3)


@pytest.mark.skipif(not (SHARED / "tldr" / "comparisons_batch13.jsonl").is_file(), reason="../shared/data absent")
def test_tldr_worker_halves_of_batch_13():
    """The defaults were chosen on half 1 and are reported on half 2: about half of the comparisons each."""
    rows = [json.loads(line) for line in (SHARED / "tldr" / "comparisons_batch13.jsonl").read_text().splitlines()]
    one, two = worker_halves_of(rows)
    assert len(one) == 14 and len(two) == 13 and not one & two
    n = [sum(r["worker"] in h for r in rows) for h in (one, two)]
    assert n == [586, 511]


def worker_halves_of(rows):
    from prlhf.sources.tldr import worker_halves

    return worker_halves(rows)


def test_tldr_sft_only_and_prompt_truncation(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    conv = convert_tldr(str(path), sft_only=True, top_k=0, max_prompt_chars=30)
    assert conv.skipped["not both supervised policies (--sft-only)"] == 10
    assert conv.written == 6
    for rec in conv.train + conv.test:
        post = rec["prompt"].split("POST: ")[1].split("\nTL;DR:")[0]
        assert len(post) <= 30


def test_tldr_bad_record_names_file_line_and_field(tmp_path):
    rows = tldr_rows()
    del rows[3]["worker"]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c\.jsonl: record 3 \(line 4\): field 'worker' is missing"):
        convert_tldr(str(path))
    (tmp_path / "bad.jsonl").write_text('{"info": {}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1: not valid JSON"):
        convert_tldr(str(tmp_path / "bad.jsonl"))


@pytest.mark.skipif(not (SHARED / "tldr" / "comparisons_batch13.jsonl").is_file(), reason="../shared/data absent")
def test_tldr_on_real_comparisons(tmp_path):
    conv = convert_tldr(str(SHARED / "tldr" / "comparisons_batch13.jsonl"), label="length", top_k=10, seed=0)
    check_common(conv)
    assert conv.read == 1097 and sum(1 for i in conv.users.values() if i["seen"]) == 10 and len(conv.users) == 27
    assert conv.written + sum(conv.skipped.values()) == 1097
    prefs = {u: i["preference"] for u, i in conv.users.items()}
    for rec in conv.train + conv.test + conv.unseen:
        longer = words(rec["chosen"]) > words(rec["rejected"])
        assert longer == (prefs[rec["user_id"]] == "long")
    assert sum(prefs[u] == "long" for u, i in conv.users.items() if i["seen"]) == 7  # 70% of 10
    again = convert_tldr(str(SHARED / "tldr" / "comparisons_batch13.jsonl"), label="length", top_k=10, seed=0)
    assert split_ids(conv) == split_ids(again)


# -- psoups ------------------------------------------------------------------------------------


def test_psoups_rlphf_files_strip_the_preference_instruction_and_keep_unseen_users_out(tmp_path):
    folder = psoups_files(tmp_path / "ps")
    conv = convert_psoups(str(folder), unseen_users=("P2A",), test_fraction=0.3,
                          profiles_dir=str(SHARED / "psoups" / "profiles") if SHARED.is_dir() else None)
    check_common(conv)
    assert conv.read == 21 and conv.skipped == {"identical responses": 3} and conv.written == 18
    assert conv.notes["preference instruction removed from prompt"] == 18
    assert set(conv.users) == {"P1A", "P1B", "P2A"} and not conv.users["P2A"]["seen"]
    for rec in conv.train + conv.test + conv.unseen:
        assert "Generate a response" not in rec["prompt"][0]["content"]
        assert rec["prompt"][0]["content"].startswith("Explain topic ")
        assert rec["chosen"][0]["content"].startswith(rec["user_id"])  # completion_a is chosen
    if SHARED.is_dir():
        assert "elementary school" in conv.users["P1A"]["profile"]


def test_psoups_hub_layout_and_profile_text(tmp_path):
    rows = [{"uid": "P3B", "prompt": "Say hi. Generate a response in an unfriendly manner.", "chosen": "What.", "rejected": "Hello!"}]
    path = write_jsonl(tmp_path / "hub.jsonl", rows)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "pref3B.txt").write_text("You are a helpful following assistant whose goal is to select the response "
                                         "that answers in an unfriendly manner for a given instruction.\n")
    conv = convert_psoups(str(path), test_fraction=0.0, profiles_dir=str(profiles), user_text="profile", format="text")
    (rec,) = conv.train
    assert rec["prompt"] == "Instruction: Say hi.\nResponse:" and rec["chosen"] == " What."
    assert rec["user_text"] == "I prefer responses that answers in an unfriendly manner."
    with pytest.raises(DataError, match="unknown P-SOUPS layout"):
        convert_psoups(str(write_jsonl(tmp_path / "x.jsonl", [{"q": 1}])))


# -- prism -------------------------------------------------------------------------------------


def test_prism_pairs_history_and_user_text(tmp_path):
    folder = prism_folder(tmp_path / "prism")
    conv = convert_prism(str(folder), unseen_fraction=0.3, test_fraction=0.3, seed=0)
    check_common(conv)
    assert conv.read == 11 and conv.skipped == {"conversation of a participant not in survey.jsonl": 1}
    # per conversation: 3 pairs in the opening turn (4 models) + 1 in turn 1 (A/B)
    assert conv.written == 10 * 4
    rec = next(r for r in conv.train + conv.test + conv.unseen if r["turn"] == 1)
    assert [m["role"] for m in rec["prompt"]] == ["user", "assistant", "user"]
    assert rec["prompt"][1]["content"].startswith("opening answer 0")  # history continues with the chosen response
    assert rec["chosen"][0]["content"].startswith("follow-up 0") and rec["rejected"][0]["content"].startswith("follow-up 1")
    text = rec["user_text"]
    assert text.startswith("It is important to me that an AI language model produces factual and informative responses (100/100)")
    assert "About me: I value honesty" in text and "reside country: United Kingdom" in text and "religion: No religion" in text
    ties = convert_prism(str(folder), skip_ties=True)
    assert ties.skipped["tied scores (--skip-ties)"] == 5  # conversation c == 1 has a tie in turn 1
    only_prefs = convert_prism(str(folder), user_fields=("stated_prefs",))
    assert "About me" not in only_prefs.train[0]["user_text"]


def test_prism_split_is_stable_and_users_do_not_straddle(tmp_path):
    folder = prism_folder(tmp_path / "prism")
    a = convert_prism(str(folder), unseen_fraction=0.4, seed=7)
    b = convert_prism(str(folder), unseen_fraction=0.4, seed=7)
    assert split_ids(a) == split_ids(b)
    conv_ids = lambda part: {r["conversation_id"] for r in part}  # noqa: E731
    assert not conv_ids(a.train) & conv_ids(a.test)  # seen users' conversations split whole


# -- dsp ---------------------------------------------------------------------------------------


def test_dsp_rejected_answers_come_from_other_domains_and_duplicates_are_skipped(tmp_path):
    path = tmp_path / "dsp.json"
    path.write_text(json.dumps(dsp_rows()))
    conv = convert_dsp(str(path), rejected_per_query=2, unseen_users=("literature",), test_fraction=0.25)
    check_common(conv)
    assert conv.read == 8
    assert conv.skipped == {"rejected candidate identical to chosen": 2}  # academy vs business in query 0, both ways
    assert conv.written == 8 * 4 * 2
    for rec in conv.train + conv.test + conv.unseen:
        if rec["query_index"] > 0:  # query 0: business answers like academy
            assert rec["chosen"][0]["content"].startswith(rec["user_id"])
        assert rec["rejected"][0]["content"] != rec["chosen"][0]["content"]
    assert {r["user_id"] for r in conv.unseen} == {"literature"}


def test_dsp_query_halves_are_disjoint(tmp_path):
    path = tmp_path / "dsp.json"
    path.write_text(json.dumps(dsp_rows()))
    halves = [convert_dsp(str(path), rejected_pool="domains", test_fraction=0.25, query_half=h) for h in (1, 2)]
    queries = [{r["query_index"] for r in c.train + c.test} for c in halves]
    assert queries == [{0, 2, 4, 6}, {1, 3, 5, 7}]
    assert halves[1].skipped["query in the other half (--query-half 2)"] == 4
    with pytest.raises(ValueError, match="query_half must be 1 or 2"):
        convert_dsp(str(path), query_half=0)


@pytest.mark.skipif(not (SHARED / "dsp" / "domain_preference_shared.json").is_file(), reason="../shared/data absent")
def test_dsp_real_file_converts_462_queries_of_four_domains():
    conv = convert_dsp(str(SHARED / "dsp" / "domain_preference_shared.json"), seed=0)
    check_common(conv)
    assert conv.read == 462 and set(conv.users) == {"academy", "business", "entertainment", "literature"}
    for rec in conv.train[:50]:
        assert rec["chosen"][0]["content"] != rec["rejected"][0]["content"]


# -- synthetic and inspector -------------------------------------------------------------------


def test_synthetic_data_conflicts_as_configured(tmp_path):
    conv = synthesize(n_users=10, unseen_users=4, majority_share=0.7, n_prompts=40, pairs_per_user=20, seed=0)
    check_common(conv)
    groups = [i["group"] for i in conv.users.values() if i["seen"]]
    assert groups.count("majority") == 7 and groups.count("minority") == 3
    for rec in conv.train + conv.test + conv.unseen:
        long_user = conv.users[rec["user_id"]]["preference"] == "long"
        assert (words(rec["chosen"]) > words(rec["rejected"])) == long_user
    assert split_ids(conv) == split_ids(synthesize(n_users=10, unseen_users=4, n_prompts=40, pairs_per_user=20, seed=0))
    assert split_ids(conv) != split_ids(synthesize(n_users=10, unseen_users=4, n_prompts=40, pairs_per_user=20, seed=1))
    stats = inspect_pairs(conv.train)
    assert stats["ceiling_on_shared_comparisons"]["per_user"] == 1.0
    assert 0.6 <= stats["ceiling_on_shared_comparisons"]["user_agnostic"] <= 0.85  # about the 70% majority
    tone = synthesize(n_users=4, unseen_users=0, attributes=("length", "tone"), n_prompts=20, pairs_per_user=10)
    assert {r["attribute"] for r in tone.train} == {"length", "tone"}


def test_inspector_hand_made():
    p = "Q"
    recs = [
        {"user_id": "a", "prompt": p, "chosen": "x", "rejected": "y"},
        {"user_id": "b", "prompt": p, "chosen": "x", "rejected": "y"},
        {"user_id": "c", "prompt": p, "chosen": "y", "rejected": "x"},
        {"user_id": "c", "prompt": "other", "chosen": "u", "rejected": "v"},
    ]
    s = inspect_pairs(load_preference_data(recs))
    assert s["n_pairs"] == 4 and s["n_users"] == 3
    assert s["pairs_per_user"] == {"min": 1, "median": 1.0, "max": 2}
    assert s["prompts_shared_by_several_users"] == 1 and s["comparisons_labelled_by_several_users"] == 1
    # user pairs: (a,b) agree, (a,c) and (b,c) disagree
    assert s["user_agreement"]["pooled"] == pytest.approx(1 / 3)
    assert s["ceiling_on_shared_comparisons"] == {"labels": 3, "user_agnostic": pytest.approx(2 / 3), "per_user": 1.0}


def test_cli_convert_synth_inspect(tmp_path, capsys):
    path = write_jsonl(tmp_path / "c.jsonl", tldr_rows())
    out = tmp_path / "tldr"
    assert main(["data", "convert", "tldr", "--input", str(path), "--output", str(out), "--label", "length",
                 "--top-k", "2", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| records read | 17 |" in printed and "| skipped: equal-length summaries (words) | 1 |" in printed
    users = json.loads((out / "users.json").read_text())
    assert {u["user_id"] for u in users["users"]} == {"w0", "w1", "w2", "w3", "w4", "w5"}
    assert all({"seen", "n_pairs", "preference", "group"} <= set(u) for u in users["users"])
    assert (out / "unseen.jsonl").is_file()
    assert main(["data", "synth", "--output", str(tmp_path / "syn"), "--n-users", "6", "--n-prompts", "20",
                 "--pairs-per-user", "8"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "syn" / "train.jsonl"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["n_users"] == 6 and set(stats["pairs_per_user"]) == {"min", "median", "max"}
    assert main(["data", "convert", "tldr", "--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_write_conversion_round_trip(tmp_path):
    conv = synthesize(n_users=3, unseen_users=1, n_prompts=10, pairs_per_user=5)
    out = write_conversion(conv, tmp_path / "o")
    assert len(load_preference_data(out / "train.jsonl")) == len(conv.train)
    assert json.loads((out / "users.json").read_text())["summary"]["written"] == conv.written
