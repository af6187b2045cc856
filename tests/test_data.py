"""The canonical record: validation errors name file, record and field; tokenization and truncation."""

import json

import pytest

from prlhf.base_models import tiny_llama
from prlhf.collate import PreferenceCollator
from prlhf.data import DataError, TokenizeSettings, load_preference_data, tokenize_dataset, tokenize_response
from prlhf.users import UserRegistry

GOOD = {"user_id": "u1", "prompt": "Hi", "chosen": " hello", "rejected": " go away"}


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "p", "chosen": "a"', "line 2: not valid JSON"),
    (json.dumps({"prompt": "p", "chosen": "a"}), "record 1 (line 2): field 'rejected' is missing"),
    (json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}), "record 1 (line 2): fields 'chosen' and 'rejected' are identical"),
    (json.dumps({"prompt": "p", "chosen": " ", "rejected": "a"}), "record 1 (line 2): field 'chosen' is empty"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "a"}), "record 1 (line 2): field 'chosen' must be a string"),
    (json.dumps({"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}), "must all be strings or all be message lists"),
    (json.dumps({"prompt": [{"content": "x"}], "chosen": [{"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "assistant", "content": "b"}]}), "field 'prompt': message 0 needs 'role' and 'content'"),
    (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "user_id": [1]}), "field 'user_id' must be"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_bad_records_name_file_record_and_field(tmp_path, bad, message):
    path = write(tmp_path, [json.dumps(GOOD), bad])
    with pytest.raises(DataError) as err:
        load_preference_data(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_records_are_normalised_and_metadata_kept(tmp_path):
    path = write(tmp_path, [json.dumps(dict(GOOD, user_id=7, source="x")), json.dumps(dict(GOOD, user_id="", user_text=""))])
    a, b = load_preference_data(path)
    assert a["user_id"] == "7" and a["source"] == "x"
    assert b["user_id"] is None and b["user_text"] is None


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_preference_data(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_preference_data(tmp_path / "e.jsonl")


def test_datasets_dataset_is_accepted():
    from datasets import Dataset

    recs = load_preference_data(Dataset.from_list([GOOD, dict(GOOD, user_id="u2")]))
    assert [r["user_id"] for r in recs] == ["u1", "u2"]


def test_conversational_records_use_the_chat_template():
    _, tok = tiny_llama()
    prompt = [{"role": "user", "content": "What is a dog?"}]
    chosen = [{"role": "assistant", "content": "An animal."}]
    prompt_ids, response_ids = tokenize_response(tok, prompt, chosen)
    text = tok.decode(prompt_ids + response_ids)
    assert text.startswith("<|im_start|>user\nWhat is a dog?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(response_ids) == "An animal.<|im_end|>\n"


def test_plain_records_end_with_eos_and_start_with_bos():
    _, tok = tiny_llama()
    prompt_ids, response_ids = tokenize_response(tok, "Hi", " hello")
    assert prompt_ids[0] == tok.bos_token_id and response_ids[-1] == tok.eos_token_id


def test_truncation_skips_are_counted_and_reported(caplog):
    _, tok = tiny_llama()
    recs = load_preference_data([GOOD, dict(GOOD, prompt="word " * 200)])
    settings = TokenizeSettings(max_length=40, max_prompt_length=None, n_user_tokens=4)
    with caplog.at_level("WARNING"):
        out = tokenize_dataset(recs, tok, settings, UserRegistry(["u1"]), "d.jsonl")
    assert len(out) == 1 and "skipped 1 of 2 records" in caplog.text and "record 1" in caplog.text


def test_prompt_truncation_keeps_bos_and_the_end_of_the_prompt():
    _, tok = tiny_llama()
    recs = load_preference_data([dict(GOOD, prompt="one two three four five six seven eight nine ten")])
    settings = TokenizeSettings(max_length=64, max_prompt_length=5, n_user_tokens=2)
    (ex,) = tokenize_dataset(recs, tok, settings, UserRegistry(["u1"]))
    assert len(ex["prompt_ids"]) == 5 and ex["prompt_ids"][0] == tok.bos_token_id
    assert tok.decode(ex["prompt_ids"][1:]).strip().endswith("ten")
    batch = PreferenceCollator(tok.pad_token_id, tok.bos_token_id, 2)([ex])
    assert batch["input_ids"].shape[1] <= 64 + 2 and batch["implicit_mask"].sum() == 2 * 2


def test_truncation_does_not_depend_on_the_user_prefix():
    """max_length counts prompt + response: with or without user tokens and user text, the same
    response tokens are kept (methods compare on the same tokens and share the reference cache)."""
    _, tok = tiny_llama()
    recs = load_preference_data([dict(GOOD, chosen=" word" * 30, rejected=" other" * 25, user_text="I am a nurse")])
    kept = []
    for n_user, text in ((0, 0), (4, 0), (4, 16)):
        settings = TokenizeSettings(max_length=20, max_prompt_length=None, n_user_tokens=n_user, max_user_text_tokens=text)
        (ex,) = tokenize_dataset(recs, tok, settings, UserRegistry(["u1"]))
        assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 20
        kept.append((ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]))
    assert kept[0] == kept[1] == kept[2]


def test_user_id_tag_survives_prompt_truncation_and_scores_the_same_response_tokens():
    """The id-in-prompt baseline: its "[user: <id>]" tag comes on top of max_prompt_length and
    max_length, like the user prefix, so a long prompt keeps the tag and the same response tokens
    and prompt end as vanilla DPO."""
    _, tok = tiny_llama()
    long_prompt = "one two three four five six seven eight nine ten eleven twelve"
    recs = load_preference_data([dict(GOOD, prompt=long_prompt, chosen=" word" * 30, rejected=" other" * 25)])
    plain = TokenizeSettings(max_length=24, max_prompt_length=5)
    tagged = TokenizeSettings(max_length=24, max_prompt_length=5, user_id_prompt="[user: {user_id}]\n")
    (a,) = tokenize_dataset(recs, tok, plain, UserRegistry(["u1"]))
    (b,) = tokenize_dataset(recs, tok, tagged, UserRegistry(["u1"]))
    assert tok.decode(b["prompt_ids"]).replace(" ", "").startswith(tok.decode(b["prompt_ids"][:1]).replace(" ", "") + "[user:u1]")
    assert b["prompt_ids"][-4:] == a["prompt_ids"][-4:]  # the prompt's end, as vanilla DPO sees it
    assert b["chosen_ids"] == a["chosen_ids"] and b["rejected_ids"] == a["rejected_ids"]
    assert len(b["prompt_ids"]) > len(a["prompt_ids"]) == 5
