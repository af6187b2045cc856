"""The `prlhf` command: YAML + flag overrides, train -> eval -> generate on a saved model, clear errors."""

import json
from collections import Counter

import pytest
import yaml
from conftest import two_user_records

from prlhf.cli import ConfigError, main, parse_config
from prlhf.config import PDPOConfig


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_flags_override_yaml(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text(yaml.safe_dump({"beta": 0.2, "alpha": 0.7, "user_model": "cluster", "n_clusters": 3,
                                        "use_lora": True, "output_dir": str(tmp_path / "o")}))
    cfg = parse_config(PDPOConfig, ["--config", str(cfg_file), "--beta", "0.5", "--n_user_tokens", "7"])
    assert (cfg.beta, cfg.alpha, cfg.user_model, cfg.n_clusters, cfg.use_lora, cfg.n_user_tokens) == (0.5, 0.7, "cluster", 3, True, 7)
    assert cfg.remove_unused_columns is False


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text("beta: 0.1\nbetta: 0.2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown config key 'betta'"):
        parse_config(PDPOConfig, ["--config", str(cfg_file)])


def test_bad_value_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="user_model"):
        parse_config(PDPOConfig, ["--user_model", "everyone", "--output_dir", str(tmp_path)])


def test_train_eval_generate_round_trip(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", two_user_records(n_prompts=16))
    test = write_jsonl(tmp_path / "test.jsonl", two_user_records(n_prompts=4, seed=1) + [
        dict(r, user_id="newcomer") for r in two_user_records(n_prompts=2, seed=2, users=("long_x",))])
    out = tmp_path / "model"
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny-llama", "train_file": str(train), "output_dir": str(out),
                                   "user_model": "individual", "n_user_tokens": 4, "learning_rate": 1e-3,
                                   "user_learning_rate": 1e-2, "per_device_train_batch_size": 8, "num_train_epochs": 1,
                                   "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "use_cpu": True}))
    assert main(["train", "--config", str(cfg), "--num_train_epochs", "3"]) == 0
    assert json.loads((out / "training_args.json").read_text())["num_train_epochs"] == 3  # the flag won

    metrics_path = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(out), "--data", str(test), "--output", str(metrics_path)]) == 0
    m = json.loads(metrics_path.read_text())
    assert m["n_pairs"] == 8 + 2
    acc = m["accuracy"]
    assert set(acc) >= {"overall", "seen", "generic", "unseen", "per_user"}
    assert set(acc["per_user"]) == {"long_fan", "short_fan", "newcomer"}
    assert m["n"] == {"seen": 8, "unseen": 2}
    assert acc["seen"] == pytest.approx((acc["per_user"]["long_fan"] + acc["per_user"]["short_fan"]) / 2)
    assert acc["unseen"] == acc["per_user"]["newcomer"]
    assert acc["seen"] >= 0.9  # the two opposite users are both learned, on held-out prompts

    # --generate with --report: the behavioural metrics per method
    assert main(["eval", "--model", str(out), "--data", str(test), "--train-data", str(train), "--generate", "2",
                 "--max-new-tokens", "4", "--report", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    method = rep["methods"]["model"]
    assert 0.0 <= method["flip_rate"] <= 1.0 and method["user_match_chance"] == 0.5
    assert method["user_match_n"] == 4  # 2 prompts for each of the 2 seen users (the newcomer is unseen)
    assert rep["n_pairs"] == {"seen": 8, "unseen": 2}
    assert rep["user_match_data"]["n"] == 8  # the held-out chosen responses of seen users, matched as a ceiling
    # --generate-prompts shared: the same 2 posts for each of the 3 users (the newcomer included)
    assert main(["eval", "--model", str(out), "--data", str(test), "--generate", "2", "--generate-prompts", "shared",
                 "--max-new-tokens", "4", "--report", str(tmp_path / "rep2")]) == 0
    assert json.loads((tmp_path / "rep2" / "report.json").read_text())["methods"]["model"]["length_prompts"] == "shared"
    gens = [json.loads(line) for line in (tmp_path / "rep2" / "generations.jsonl").read_text().splitlines()]
    by_user = {u: sorted(g["prompt"] for g in gens if g["user_id"] == u) for u in ("long_fan", "short_fan", "newcomer")}
    assert by_user["long_fan"] == by_user["short_fan"] == by_user["newcomer"] and len(by_user["long_fan"]) == 2

    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--user", "long_fan", "--prompt", "Q: the dog\nA:", "--max-new-tokens", "5"]) == 0
    single = capsys.readouterr().out.strip()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Q: the dog\nA:", "user_id": "long_fan"},
                                                        {"prompt": "Q: the cat\nA:", "user_id": None},
                                                        {"prompt": "Q: the dog\nA:", "user_id": "short_fan"}])
    gen_out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(out), "--input", str(prompts), "--output", str(gen_out),
                 "--max-new-tokens", "5"]) == 0
    assert "tokens/s" in capsys.readouterr().out  # batch mode reports its throughput
    rows = [json.loads(line) for line in gen_out.read_text().splitlines()]
    assert [r["user_id"] for r in rows] == ["long_fan", None, "short_fan"]
    assert rows[0]["response"].strip() == single  # batch mode == single mode for the same user and prompt


def test_bad_data_gives_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    assert main(["train", "--train_file", str(bad), "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: record 1 (line 2): field 'rejected' is missing" in err


def test_sft_reads_a_pdpo_recipe_and_missing_model_is_a_clear_error(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", two_user_records(n_prompts=2))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"train_file": str(train), "user_model": "cluster", "alpha": 0.3, "max_steps": 1,
                                   "output_dir": str(tmp_path / "sft"), "report_to": "none", "use_cpu": True}))
    assert main(["sft", "--config", str(cfg)]) == 0
    assert (tmp_path / "sft" / "model.safetensors").is_file()
    assert main(["train", "--config", str(cfg), "--model_name_or_path", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such model folder" in capsys.readouterr().err


def test_count_new_tokens_stops_at_eos_and_padding():
    import torch

    from prlhf.generation import count_new_tokens

    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [5, 0, 0, 0, 0]])
    assert count_new_tokens(ids, eos_id=2, pad_id=0) == 3 + 5 + 1


def test_every_command_takes_a_config_file_and_flags_alike(tmp_path, capsys, monkeypatch):
    """eval and generate are thin shells over EvalConfig / GenerateConfig (YAML keys = field names,
    flags with hyphens or underscores, flags win); data commands read the same YAML style."""
    from prlhf.cli import _merge_repeated
    from prlhf.config import EvalConfig, GenerateConfig

    assert _merge_repeated(["--model", "a", "--data", "t", "--model", "b"], "--model") == ["--model", "a", "b", "--data", "t"]
    cfg = parse_config(EvalConfig, ["--model", "m1", "m2", "--data", "t.jsonl", "--max-new-tokens", "9", "--per-pair"])
    assert (cfg.model, cfg.max_new_tokens, cfg.per_pair) == (["m1", "m2"], 9, True)
    with pytest.raises(ValueError, match="--dtype must be one of"):
        parse_config(EvalConfig, ["--model", "m", "--data", "t", "--dtype", "float8"])
    with pytest.raises(ValueError, match="give either --prompt or --input"):
        parse_config(GenerateConfig, ["--model", "m"])

    data_cfg = tmp_path / "data.yaml"
    data_cfg.write_text(yaml.safe_dump({"output": str(tmp_path / "d"), "n_users": 2, "unseen_users": 1, "n_prompts": 10,
                                        "pairs_per_user": 4}))
    assert main(["data", "synth", "--config", str(data_cfg), "--n-users", "3"]) == 0  # the flag wins
    users = json.loads((tmp_path / "d" / "users.json").read_text())
    assert users["summary"]["users_seen"] == 3 and users["summary"]["users_unseen"] == 1

    out = tmp_path / "model"
    train_cfg = tmp_path / "t.yaml"
    train_cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny-llama", "train_file": str(tmp_path / "d" / "train.jsonl"),
                                         "output_dir": str(out), "max_steps": 1, "n_user_tokens": 2, "save_strategy": "no",
                                         "report_to": "none", "disable_tqdm": True, "use_cpu": True}))
    assert main(["train", "--config", str(train_cfg)]) == 0
    eval_cfg = tmp_path / "e.yaml"
    eval_cfg.write_text(yaml.safe_dump({"model": [str(out)], "data": [str(tmp_path / "d" / "train.jsonl")],
                                        "output": str(tmp_path / "m.json"), "batch_size": 4}))
    assert main(["eval", "--config", str(eval_cfg), "--max-pairs-per-user", "2"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    per_user = Counter(json.loads(line)["user_id"] for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines())
    assert m["n_pairs"] == sum(min(n, 2) for n in per_user.values()) < sum(per_user.values())  # the first 2 of each user
    gen_cfg = tmp_path / "g.yaml"
    gen_cfg.write_text(yaml.safe_dump({"model": str(out), "prompt": "Q: hi\nA:", "max_new_tokens": 3}))
    from prlhf.modeling import PersonalizedLM

    produced = []
    real = PersonalizedLM.generate_ids

    def recording(self, batch, **kw):
        ids = real(self, batch, **kw)
        produced.append((kw, ids))
        return ids

    monkeypatch.setattr(PersonalizedLM, "generate_ids", recording)
    gen_cfg.write_text(yaml.safe_dump({"model": str(out), "prompt": "Q: hi\nA:", "max_new_tokens": 24}))
    assert main(["generate", "--config", str(gen_cfg), "--no-repeat-ngram-size", "1"]) == 0
    kw, ids = produced[-1]
    assert kw["no_repeat_ngram_size"] == 1 and kw["max_new_tokens"] == 24  # the flag wins over and adds to the YAML
    tokens = [t for t in ids[0].tolist() if t != PersonalizedLM.from_pretrained(out).tokenizer.pad_token_id]
    assert len(tokens) == len(set(tokens))  # no token (1-gram) generated twice


def test_each_command_reads_its_config_file_and_flags_win(tmp_path):
    """adapt, users, serve, judge, demo and data parse ``--config FILE.yaml`` into their config
    dataclass like train and eval do (YAML keys are field names, flags with hyphens win)."""
    from prlhf.config import (
        AdaptConfig,
        DemoConfig,
        DspConvertConfig,
        JudgeConfig,
        RewardDemoConfig,
        ServeConfig,
        SynthConfig,
        TldrConvertConfig,
        UsersConfig,
    )

    def cfg(cls, data, *flags):
        path = tmp_path / f"{cls.__name__}.yaml"
        path.write_text(yaml.safe_dump(data))
        return parse_config(cls, ["--config", str(path), *flags])

    a = cfg(AdaptConfig, {"model": "m", "data": "d.jsonl", "output": "o", "steps": 7}, "--learning-rate", "0.05")
    assert (a.steps, a.learning_rate, a.strategy) == (7, 0.05, "active")
    assert cfg(UsersConfig, {"action": "export", "model": "m", "user": "zoe"}).user == "zoe"
    s = cfg(ServeConfig, {"model": "m", "port": 9001}, "--max-batch-size", "4")
    assert (s.host, s.port, s.max_batch_size) == ("127.0.0.1", 9001, 4)
    j = cfg(JudgeConfig, {"generations": "g", "a": "x", "b": "y", "base_url": "u", "model": "j", "output": "o.json"},
            "--concurrency", "2")
    assert (j.template, j.concurrency) == ("generic", 2)
    assert cfg(DemoConfig, {"seed": 3}, "--ablations").ablations and cfg(RewardDemoConfig, {"best_of": 4}).best_of == 4
    t = cfg(TldrConvertConfig, {"input": "i", "output": "o", "top_k": 0, "worker_half": 2}, "--label", "length")
    assert t.converter_kwargs()["top_k"] is None and (t.label, t.worker_half) == ("length", 2)
    assert cfg(DspConvertConfig, {"input": "i", "output": "o", "unseen_users": ["a", "b"]}).converter_kwargs()[
        "unseen_users"] == ("a", "b")
    assert cfg(DspConvertConfig, {"input": "i", "output": "o"}, "--unseen-users", "a,b").converter_kwargs()[
        "unseen_users"] == ("a", "b")  # comma-separated, as before
    assert cfg(SynthConfig, {"output": "o", "attributes": "length,tone"}).attributes == ["length", "tone"]
    with pytest.raises(ValueError, match="needs --user ID"):
        cfg(UsersConfig, {"action": "remove", "model": "m"})
    with pytest.raises(ConfigError, match="unknown config key 'stepz' for AdaptConfig"):
        cfg(AdaptConfig, {"model": "m", "stepz": 3})
    with pytest.raises(ConfigError, match="nowhere.yaml: no such config file"):
        parse_config(ServeConfig, ["--config", str(tmp_path / "nowhere.yaml")])


def test_version_module_entry_point_and_usage_messages(capsys):
    import subprocess
    import sys

    import prlhf

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"prlhf {prlhf.__version__}"
    assert main(["rm", "--help"]) == 0 and "prlhf rm train --config FILE" in capsys.readouterr().out
    assert main(["rm", "nosuch"]) == 2 and "unknown action 'nosuch'" in capsys.readouterr().err
    assert main(["nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'nosuch'" in err and "train" in err and "prlhf --help" in err
    assert main(["data"]) == 2 and "data convert {tldr,psoups,prism,dsp}" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "prlhf", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"prlhf {prlhf.__version__}"
