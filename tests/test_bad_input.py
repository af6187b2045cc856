"""Bad input and faults, as a careful new user meets them: every case ends with a clear message and
the documented exit code (2: bad input or refused setting; 3: non-finite values), never a Python
traceback; counted skips where a record can simply be left out.

Each row of ``CASES`` builds its input in a temporary folder and runs one ``prlhf`` command
in-process; the shared trained model (tiny-llama, a few steps) is built once per module."""

import json
import shutil

import pytest
import yaml
from conftest import two_user_records

from prlhf.cli import main

TRAIN_KW = {"model_name_or_path": "tiny-llama", "user_model": "individual", "n_user_tokens": 2, "learning_rate": 1e-3,
            "per_device_train_batch_size": 8, "max_steps": 2, "save_strategy": "no", "report_to": "none",
            "disable_tqdm": True, "use_cpu": True, "reference_cache_dir": "none"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def recipe(tmp, **over):
    train = tmp / "train.jsonl"
    if not train.exists():
        write_jsonl(train, two_user_records(n_prompts=4))
    cfg = tmp / "r.yaml"
    cfg.write_text(yaml.safe_dump({**TRAIN_KW, "train_file": str(train), "output_dir": str(tmp / "out"), **over}))
    return ["--config", str(cfg)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved model folder (2 steps), reused read-only by the cases (they copy it to damage it)."""
    tmp = tmp_path_factory.mktemp("trained")
    assert main(["train", *recipe(tmp)]) == 0
    return tmp / "out"


def copy_model(trained, tmp):
    dst = tmp / "model"
    shutil.copytree(trained, dst)
    return dst


# -- each case: (tmp, trained) -> argv; the expected exit code and message fragment ----------------

def bad_record(tmp, rec):
    return ["data", "inspect", str(write_jsonl(tmp / "bad.jsonl", [rec]))]


def chat(content=None, role="user"):
    return {"user_id": "u", "prompt": [{"role": role, "content": content}],
            "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}


def case_content_null(tmp, trained):
    return bad_record(tmp, chat(content=None))


def case_role_not_string(tmp, trained):
    return bad_record(tmp, chat(content="hi", role=3))


def case_user_id_bool(tmp, trained):
    return bad_record(tmp, {"user_id": True, "prompt": "p", "chosen": "a", "rejected": "b"})


def case_not_utf8(tmp, trained):
    path = tmp / "latin1.jsonl"
    path.write_bytes(b'{"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b"}\n'
                     b'{"user_id": "u", "prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    return ["data", "inspect", str(path)]


def case_beta(value):
    return lambda tmp, trained: ["train", *recipe(tmp), "--beta", value]


def case_flag(flag, value):
    return lambda tmp, trained: ["train", *recipe(tmp), flag, value]


def case_output_is_model(tmp, trained):
    model = copy_model(trained, tmp)
    return ["train", *recipe(tmp), "--model_name_or_path", str(model), "--output_dir", str(model)]


def case_output_under_file(tmp, trained):
    (tmp / "afile").write_text("x")
    return ["train", *recipe(tmp), "--output_dir", str(tmp / "afile" / "out")]


def case_resume_missing(tmp, trained):
    return ["train", *recipe(tmp), "--resume_from_checkpoint", str(tmp / "nowhere" / "checkpoint-3")]


def case_resume_torn_state(tmp, trained):
    ckpt = tmp / "out" / "checkpoint-2"
    shutil.copytree(trained, ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 2, "log_hist')
    return ["train", *recipe(tmp), "--resume_from_checkpoint", str(ckpt)]


def case_resume_other_users(tmp, trained):
    ckpt = tmp / "out" / "checkpoint-2"
    shutil.copytree(trained, ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    write_jsonl(tmp / "train.jsonl", two_user_records(n_prompts=4, users=("long_other", "short_other")))
    return ["train", *recipe(tmp), "--resume_from_checkpoint", str(ckpt)]


def case_weights_flipped(tmp, trained):
    model = copy_model(trained, tmp)
    path = model / "user_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    return ["eval", "--model", str(model), "--data", str(write_jsonl(tmp / "t.jsonl", two_user_records(2)))]


def case_weights_truncated(tmp, trained):
    model = copy_model(trained, tmp)
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return ["generate", "--model", str(model), "--prompt", "Q: hi\nA:"]


def case_weights_missing(tmp, trained):
    model = copy_model(trained, tmp)
    (model / "user_model.safetensors").unlink()
    return ["generate", "--model", str(model), "--prompt", "Q: hi\nA:"]


def case_users_do_not_match_weights(tmp, trained):
    """A legacy folder (no manifest) whose users.json lists another number of users."""
    model = copy_model(trained, tmp)
    (model / "manifest.json").unlink()
    (model / "users.json").write_text(json.dumps({"generic_row": 0, "users": ["a", "b", "c", "d"]}))
    return ["generate", "--model", str(model), "--prompt", "Q: hi\nA:"]


def case_users_json_edited(tmp, trained):
    model = copy_model(trained, tmp)
    (model / "users.json").write_text(json.dumps({"generic_row": 0, "users": ["short_fan", "long_fan"]}))
    return ["generate", "--model", str(model), "--prompt", "Q: hi\nA:"]


def case_generate_output_under_file(tmp, trained):
    (tmp / "afile").write_text("x")
    prompts = write_jsonl(tmp / "p.jsonl", [{"prompt": "Q: hi\nA:", "user_id": "long_fan"}])
    return ["generate", "--model", str(trained), "--input", str(prompts), "--output", str(tmp / "afile" / "o.jsonl"),
            "--max-new-tokens", "2"]


def synth(tmp, *extra):
    return ["data", "synth", "--output", str(tmp / "data"), "--n-users", "4", "--unseen-users", "1",
            "--n-prompts", "10", "--pairs-per-user", "4", *extra]


def case_convert_into_used_folder(tmp, trained):
    assert main(synth(tmp)) == 0
    return synth(tmp, "--unseen-users", "0")


def case_convert_output_under_file(tmp, trained):
    (tmp / "afile").write_text("x")
    return ["data", "synth", "--output", str(tmp / "afile" / "d")]


def case_test_fraction(value):
    return lambda tmp, trained: synth(tmp, "--test-fraction", value)


def tldr_rows(policy="sup1", text_a="a short one", text_b="a much longer summary of the post"):
    rows = []
    for i in range(6):
        rows.append({"info": {"id": f"p{i}", "post": "a post", "title": "t", "subreddit": "s"},
                     "summaries": [{"text": text_a, "policy": policy}, {"text": text_b, "policy": policy}],
                     "choice": i % 2, "worker": f"w{i % 3}"})
    return rows


def case_long_share(tmp, trained):
    src = write_jsonl(tmp / "c.jsonl", tldr_rows())
    return ["data", "convert", "tldr", "--input", str(src), "--output", str(tmp / "d"), "--label", "length",
            "--long-share", "2"]


def case_empty_dsp(tmp, trained):
    (tmp / "dsp.json").write_text("[]")
    return ["data", "convert", "dsp", "--input", str(tmp / "dsp.json"), "--output", str(tmp / "d")]


CASES = {
    # id: (build argv, exit code, message fragment)
    "chat content null": (case_content_null, 2, "'content' must be a string"),
    "chat role not a string": (case_role_not_string, 2, "'role' must be a non-empty string"),
    "user_id true": (case_user_id_bool, 2, "field 'user_id' must be a string"),
    "not UTF-8": (case_not_utf8, 2, "line 2: not UTF-8"),
    "beta nan": (case_beta("nan"), 2, "beta must be a finite number"),
    "beta inf": (case_beta("inf"), 2, "beta must be a finite number"),
    "learning_rate inf": (case_flag("--learning_rate", "inf"), 2, "learning_rate must be a finite number"),
    "user_learning_rate inf": (case_flag("--user_learning_rate", "inf"), 2, "user_learning_rate must be a finite number"),
    "label_smoothing 2": (case_flag("--label_smoothing", "2"), 2, "label_smoothing must lie in [0, 0.5)"),
    "max_prompt_length 0": (case_flag("--max_prompt_length", "0"), 2, "max_prompt_length must be at least 1"),
    "output_dir = model": (case_output_is_model, 2, "is the model_name_or_path folder"),
    "train output_dir under a file": (case_output_under_file, 2, "is a file, not a folder"),
    "resume from a missing path": (case_resume_missing, 2, "is not a checkpoint folder"),
    "resume from a torn state": (case_resume_torn_state, 2, "does not parse"),
    "resume with other users": (case_resume_other_users, 2, "trained on other users"),
    "flipped bytes in weights": (case_weights_flipped, 2, "does not match its SHA-256"),
    "truncated weights": (case_weights_truncated, 2, "model.safetensors does not match its SHA-256"),
    "missing weights": (case_weights_missing, 2, "user_model.safetensors is listed in manifest.json but missing"),
    "users.json does not match the weights": (case_users_do_not_match_weights, 2, "do not belong together"),
    "users.json edited": (case_users_json_edited, 2, "users.json does not match its SHA-256"),
    "generate output under a file": (case_generate_output_under_file, 2, "is a file, not a folder"),
    "convert into a used folder": (case_convert_into_used_folder, 2, "not empty"),
    "convert output under a file": (case_convert_output_under_file, 2, "is a file, not a folder"),
    "test fraction above 1": (case_test_fraction("1.5"), 2, "test_fraction must lie in [0, 1]"),
    "test fraction below 0": (case_test_fraction("-0.1"), 2, "test_fraction must lie in [0, 1]"),
    "long share 2": (case_long_share, 2, "long_share must lie in [0, 1]"),
    "empty DSP file": (case_empty_dsp, 2, "holds no pairs"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_clear_error(name, tmp_path, trained, capsys):
    build, code, fragment = CASES[name]
    argv = build(tmp_path, trained)
    capsys.readouterr()
    assert main(argv) == code
    captured = capsys.readouterr()
    err = captured.err
    assert fragment in err, err
    assert "Traceback" not in err + captured.out
    assert f"prlhf {argv[0]}: error: " in err


# -- counted skips: the record is left out, and the summary says so ------------------------------

def test_whitespace_summary_and_odd_policy_are_counted_skips(tmp_path, capsys):
    rows = tldr_rows(policy=None) + tldr_rows(text_a="   ") + tldr_rows()
    for r in rows[:6]:
        for s in r["summaries"]:
            s["policy"] = 7  # not a string: not a supervised policy
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    assert main(["data", "convert", "tldr", "--input", str(src), "--output", str(tmp_path / "d"), "--sft-only",
                 "--top-k", "0"]) == 0
    out = capsys.readouterr().out
    assert "not both supervised policies (--sft-only)" in out and "empty summary" in out
    users = json.loads((tmp_path / "d" / "users.json").read_text())
    assert users["summary"]["skipped"] == {"not both supervised policies (--sft-only)": 6, "empty summary": 6}
    # what the converter writes, the loader reads
    assert main(["data", "inspect", str(tmp_path / "d" / "train.jsonl")]) == 0


def test_convert_overwrite_leaves_no_stale_unseen_file(tmp_path):
    assert main(synth(tmp_path)) == 0
    assert (tmp_path / "data" / "unseen.jsonl").is_file()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    assert main(synth(tmp_path, "--unseen-users", "0", "--overwrite")) == 0
    assert not (tmp_path / "data" / "unseen.jsonl").exists()  # from the earlier conversion: gone
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"  # the user's own file: kept
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"train.jsonl", "test.jsonl", "users.json"}


def test_debug_flag_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="beta must be a finite number"):
        main(["train", *recipe(tmp_path), "--beta", "nan", "--debug"])
