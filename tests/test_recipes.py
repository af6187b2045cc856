"""Every recipe's documented commands run as written: the `prlhf sft` / `prlhf train` lines in each
YAML recipe's header, in a scratch folder holding tiny data at the recipe's data paths, with the
base model replaced by tiny-llama and one training step; and the real-model shell recipes end to
end on tiny data files of their input formats (PRLHF_RECIPE_OVERRIDES makes them tiny)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import two_user_records
from fixtures import dsp_rows, tldr_rows, write_jsonl

from prlhf.cli import main
from prlhf.runs import documented_commands

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# one step, small sequences, CPU, float32: the commands' own settings otherwise
FAST = ["--max_steps", "1", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--bf16", "false", "--use_cpu", "true", "--max_length", "256", "--max_prompt_length", "128",
        "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"]


def yaml_recipes() -> list[Path]:
    return sorted(p for p in RECIPES.glob("*.yaml") if not p.name.startswith("smollm2_"))


def test_every_yaml_recipe_documents_its_commands():
    for path in yaml_recipes():
        cmds = documented_commands(path)
        assert cmds, f"{path.name}: no documented `prlhf sft` / `prlhf train` command"
        mine = [c for c in cmds if f"recipes/{path.name}" in c]
        assert mine, f"{path.name}: its header does not run it"
        for cmd in cmds:
            assert Path(ROOT, cmd[cmd.index("--config") + 1]).is_file(), f"{path.name}: {cmd} names a missing recipe"


def test_documented_commands_run_as_written(tmp_path, monkeypatch):
    """sft then train, as each header says, from a scratch folder: the SFT step builds the folder
    the training recipe starts from (no recipe's SFT command may start from its own output)."""
    texts = "\n".join(p.read_text() for p in yaml_recipes())
    records = [dict(r, user_text="I like short answers" if r["user_id"].startswith("short") else None)
               for r in two_user_records(n_prompts=3)]
    for rel in sorted(set(re.findall(r"(?:data|outputs)/[\w./-]+\.jsonl", texts))):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / rel, records)
    sft, train = [], []  # each distinct command once: every SFT step first, then the training runs
    for path in yaml_recipes():
        for cmd in documented_commands(path):
            if cmd not in sft + train:
                (sft if cmd[0] == "sft" else train).append(cmd)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRLHF_REFERENCE_CACHE", str(tmp_path / "refcache"))
    (tmp_path / "recipes").symlink_to(RECIPES)
    for cmd in sft + train:
        cfg = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text())
        argv = list(cmd)
        if "--model_name_or_path" not in argv and not str(cfg["model_name_or_path"]).startswith("outputs/"):
            argv += ["--model_name_or_path", "tiny-llama"]  # a hub base model: offline, the tiny one
        assert main(argv + FAST) == 0, f"`prlhf {' '.join(cmd)}` failed"
    for cmd in train:
        cfg = yaml.safe_load(Path(cmd[cmd.index("--config") + 1]).read_text())
        assert (tmp_path / cfg["output_dir"] / "prlhf_config.json").is_file(), f"{cmd}: no model saved"


_SERVER: list = []


def prlhf_fork_server():
    """One fork server for the session's recipe runs (tests/forkserver.py: the `prlhf` lines of a recipe
    skip the interpreter's start-up, seconds each); None with PRLHF_TEST_NO_FORKSERVER=1."""
    if os.environ.get("PRLHF_TEST_NO_FORKSERVER") == "1":
        return None
    if not _SERVER:
        import atexit
        import tempfile

        from forkserver import ForkServer

        _SERVER.append(ForkServer(tempfile.mkdtemp(prefix="prlhf-forkserver-")))
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


def run_shell_recipe(script: str, input_path: Path, out: Path, overrides: str, **env_extra: str) -> dict:
    env = {**os.environ, "PRLHF_RECIPE_OVERRIDES": overrides, "PRLHF_EVAL_OVERRIDES": "--generate 1 --max-new-tokens 4",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env_extra}
    server = prlhf_fork_server()
    if server is not None:
        env = server.env(env)
        served_before = len(server.served())
    res = subprocess.run(["bash", str(RECIPES / script), str(input_path), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    if server is not None:  # its `prlhf` lines ran in the fork server, each one ending 0
        served = server.served()[served_before:]
        assert served and all(c["rc"] == 0 for c in served), served
    return json.loads((out / "report.json").read_text())


SHELL_FAST = ("--model_name_or_path tiny-llama --max_steps 1 --per_device_train_batch_size 2 "
              "--gradient_accumulation_steps 1 --disable_tqdm true --logging_steps 1")


def check_contract(report: dict, lengths: bool) -> None:
    assert isinstance(report["runtime_seconds"], float) and report["runtime_seconds"] > 0
    for name in ("dpo", "pdpo_individual"):
        m = report["methods"][name]
        assert set(m["accuracy"]) >= {"seen", "generic", "unseen"}
        assert m["user_match"] is None or 0.0 <= m["user_match"] <= 1.0
        assert m["flip_rate"] is None or 0.0 <= m["flip_rate"] <= 1.0
        if lengths:
            assert set(m["length"]) >= {"majority", "minority", "unseen"}
    assert report["methods"]["dpo"]["flip_rate"] == 0.0  # vanilla DPO cannot tell users apart
    if "dpo_user_id" in report["methods"]:  # the prompt baseline: its generic user is the prompt without the id
        baseline = report["methods"]["dpo_user_id"]
        assert baseline["accuracy_difference"]["vs"] == "dpo" and 0.0 <= baseline["flip_rate"] <= 1.0
    assert report["methods"]["pdpo_individual"]["accuracy_difference"]["vs"] == "dpo"
    assert report["n_pairs"]["seen"] > 0


def tldr_comparisons(n_workers: int = 26, per_worker: int = 6) -> list[dict]:
    """summarize_from_feedback rows: more workers than the recipe's top-k, so some are unseen."""
    base = tldr_rows()[0]
    rows = []
    for w in range(n_workers):
        for k in range(per_worker):
            i = w * per_worker + k
            rows.append(dict(base, worker=f"worker{w:02d}", info=dict(base["info"], id=f"t3_{i}", title=f"Title {i}"),
                             summaries=[{"text": f" short summary {i}", "policy": "sup"},
                                        {"text": f" a much longer summary of post {i} with many more words", "policy": "sup"}]))
    return rows


def test_smollm2_tldr_recipe_runs_on_a_tiny_file(tmp_path):
    src = write_jsonl(tmp_path / "comparisons.jsonl", tldr_comparisons())
    report = run_shell_recipe("smollm2_tldr_cpu.sh", src, tmp_path / "out", SHELL_FAST)
    check_contract(report, lengths=True)
    assert set(report["methods"]) == {"dpo", "dpo_user_id", "pdpo_individual"}
    # three stages: pi_SFT first, and every method starts from it (its reference is pi_SFT)
    assert (tmp_path / "out" / "sft" / "model.safetensors").is_file()
    for method in report["methods"]:
        cfg = json.loads((tmp_path / "out" / method / "prlhf_config.json").read_text())
        assert Path(cfg["base_model_name_or_path"]).resolve() == (tmp_path / "out" / "sft").resolve(), method


def test_smollm2_dsp_recipe_runs_on_a_tiny_file(tmp_path):
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 4))
    report = run_shell_recipe("smollm2_dsp_cpu.sh", src, tmp_path / "out", SHELL_FAST)
    check_contract(report, lengths=False)
    assert set(report["methods"]) == {"dpo", "dpo_user_id", "pdpo_individual"}
    assert report["methods"]["pdpo_individual"]["user_match_chance"] == 0.25


def test_smollm2_dsp_policy_or_rm_recipe_runs_on_a_tiny_file(tmp_path, monkeypatch):
    """P-DPO, two P-RM layouts and a vanilla RM on the same pairs, one table: accuracy per user, training
    seconds per pair, user match of the policy's answers and of each RM's best-of-n pick. The models of an
    earlier run on the same conversion (PRLHF_MODELS_FROM: here P-DPO, the after_response P-RM and the
    vanilla RM, trained in-process) are linked, the missing one (the prefix P-RM) is trained."""
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 4))
    earlier = tmp_path / "earlier"
    monkeypatch.setenv("PRLHF_REFERENCE_CACHE", str(tmp_path / "refcache"))
    assert main(["data", "convert", "dsp", "--input", str(src), "--output", str(earlier / "data"), "--rejected-pool", "domains",
                 "--format", "text", "--test-fraction", "0.2", "--seed", "0", "--query-half", "2"]) == 0
    fast = SHELL_FAST.split() + ["--train_file", str(earlier / "data" / "train.jsonl"), "--use_lora", "true",
                                 "--max_length", "80", "--max_prompt_length", "48"]
    assert main(["train", *fast, "--output_dir", str(earlier / "pdpo_individual"), "--user_model", "individual"]) == 0
    assert main(["rm", "train", *fast, "--output_dir", str(earlier / "prm_individual"), "--user_model", "individual"]) == 0
    assert main(["rm", "train", *fast, "--output_dir", str(earlier / "rm_uniform"), "--user_model", "uniform"]) == 0
    compare = "--sampler tiny-llama --best-of 2 --prompts-per-user 1 --max-new-tokens 4"
    report = run_shell_recipe("smollm2_dsp_policy_or_rm.sh", src, tmp_path / "out", SHELL_FAST,
                              PRLHF_COMPARE_OVERRIDES=compare, PRLHF_MODELS_FROM=f"{tmp_path / 'nothing'} {earlier}")
    out = tmp_path / "out"
    assert (out / "prm_after_response").resolve() == (earlier / "prm_individual").resolve()  # linked
    assert (out / "pdpo_individual").is_symlink() and (out / "rm_uniform").is_symlink()
    assert not (out / "prm_prefix").is_symlink() and (out / "prm_prefix" / "manifest.json").is_file()  # trained here
    trained = ["pdpo_individual", "prm_after_response", "prm_prefix", "rm_uniform"]
    assert list(report["methods"])[:4] == trained
    assert report["methods"]["pdpo_individual"]["kind"] == "policy (implicit reward)"
    assert report["methods"]["prm_prefix"]["kind"] == "reward model, user tokens prefix"
    assert report["methods"]["prm_after_response"]["kind"] == "reward model, user tokens after_response"
    assert report["methods"]["rm_uniform"]["kind"] == "reward model"
    seen = {json.loads(line)["user_id"] for line in (out / "data" / "test.jsonl").read_text().splitlines()}
    for name in trained:
        m = report["methods"][name]
        state = json.loads((out / name / "trainer_state.json").read_text())
        runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
        assert m["training"]["seconds_per_pair"] == pytest.approx(runtime / (1 * 2))  # 1 step of 2 pairs
        assert 0.0 <= m["accuracy"]["seen"] <= 1.0
        assert set(m["accuracy_per_user"]) == seen
        assert 0.0 <= m["generation"]["user_match"] <= 1.0
    gens = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert {g["method"] for g in gens} == set(report["methods"])
    assert report["methods"]["prm_prefix"]["generation"]["how"].startswith("best of 2")


def test_smollm2_tldr_defaults_recipe_runs_on_a_tiny_file(tmp_path):
    """The newcomer's run: P-DPO and vanilla DPO at the defaults, on half 2 of the workers; PRLHF_METHODS adds the
    prompt baseline (vanilla DPO with the user id in the prompt)."""
    src = write_jsonl(tmp_path / "comparisons.jsonl", tldr_comparisons())
    report = run_shell_recipe("smollm2_tldr_defaults.sh", src, tmp_path / "out", SHELL_FAST,
                              PRLHF_METHODS="dpo dpo_user_id pdpo_individual", PRLHF_EVAL_OVERRIDES="--generate 1 --max-new-tokens 4 --per-pair")
    check_contract(report, lengths=False)
    assert list(report["methods"]) == ["dpo", "dpo_user_id", "pdpo_individual"]
    # with three methods, each is compared with every earlier one on the same pairs: P-DPO minus the prompt
    # baseline, recomputed here from the per-pair results
    models = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"]
    base = {p["index"]: p["correct"] for p in models["dpo_user_id"]["pairs"] if p["seen"]}
    diffs = [p["correct"] - base[p["index"]] for p in models["pdpo_individual"]["pairs"] if p["seen"]]
    pairwise = report["methods"]["pdpo_individual"]["accuracy_differences"]
    assert set(pairwise) == {"dpo", "dpo_user_id"}
    assert pairwise["dpo_user_id"]["seen"]["mean"] == pytest.approx(sum(diffs) / len(diffs))
    assert pairwise["dpo_user_id"]["seen"]["n"] == len(diffs) == report["n_pairs"]["seen"]
    assert pairwise["dpo"]["seen"] == report["methods"]["pdpo_individual"]["accuracy_difference"]["seen"]
    assert "| pdpo_individual | dpo_user_id |" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "dpo_user_id" / "prlhf_config.json").read_text())["user_id_prompt"] == "[user: {user_id}]\n"
    pdpo = report["methods"]["pdpo_individual"]
    assert set(pdpo["flip_rate_by_group"]) == {"majority", "minority"} == set(pdpo["accuracy_by_group"])
    users = json.loads((tmp_path / "out" / "data" / "users.json").read_text())
    assert users["options"]["worker_half"] == 2
    # the P-DPO run kept its health signal in trainer_state.json
    state = json.loads((tmp_path / "out" / "pdpo_individual" / "trainer_state.json").read_text())
    assert any("eval_flip_rate" in e for e in state["log_history"])


def test_smollm2_dsp_defaults_recipe_runs_on_a_tiny_file(tmp_path):
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 4))
    report = run_shell_recipe("smollm2_dsp_defaults.sh", src, tmp_path / "out", SHELL_FAST)
    check_contract(report, lengths=False)
    assert list(report["methods"]) == ["dpo", "pdpo_individual"]  # the default PRLHF_METHODS
    assert json.loads((tmp_path / "out" / "data" / "users.json").read_text())["options"]["query_half"] == 2


def test_smollm2_dsp_new_user_recipe_runs_on_a_tiny_file(tmp_path):
    """The new-user recipe: one domain kept out, its curve over k, the fully trained user and the prompt
    baseline on the same held-out pairs, in OUTPUT_DIR/report.json."""
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 6))
    report = run_shell_recipe("smollm2_dsp_new_user.sh", src, tmp_path / "out", SHELL_FAST, PRLHF_ADAPT_STEPS="1",
                              PRLHF_NEW_USER="business", PRLHF_QUERY_HALF="all")
    nu = report["new_user"]
    assert nu["users"] == ["business"] and nu["held_out_pairs"] > 0
    assert set(nu["accuracy_by_k"]) == {"0", "2", "4", "8", "16", "32"} == set(report["baseline"]["accuracy_by_k"])
    assert 0.0 <= nu["fully_trained_accuracy"] <= 1.0 and set(nu["gap_closed"]) == {"2", "4", "8", "16", "32"}
    assert report["runtime_seconds"] > 0 and (tmp_path / "out" / "report.md").is_file()
    # the fully trained model saw the new user's pool pairs, the other one did not
    users = json.loads((tmp_path / "out" / "pdpo_all_users" / "users.json").read_text())
    assert "business" in json.dumps(users)
    assert "business" not in json.dumps(json.loads((tmp_path / "out" / "pdpo_without_new_user" / "users.json").read_text()))


def test_defaults_recipes_set_no_personalization_setting():
    """A newcomer's run gives `prlhf train` only the model, data, output folder, use_lora, lengths and steps."""
    allowed = {"--model_name_or_path", "--train_file", "--output_dir", "--user_model", "--use_lora", "--max_length",
               "--max_prompt_length", "--max_steps", "--per_device_train_batch_size", "--reference_cache_dir",
               "--user_id_in_prompt"}  # the prompt baseline's defining flag, not a personalization setting
    for script in ("smollm2_tldr_defaults.sh", "smollm2_dsp_defaults.sh", "smollm2_dsp_rm_defaults.sh"):
        text = (RECIPES / script).read_text()
        start = text.index("\n    prlhf " + ("rm train" if "_rm_" in script else "train"))
        train = text[start:text.index("\ndone", start)]
        found = set(re.findall(r"--\w+", train))
        assert found <= allowed and allowed - found <= {"--reference_cache_dir", "--user_id_in_prompt"}, script


def test_defaults_recipes_refuse_an_unknown_method(tmp_path):
    env = dict(os.environ, PRLHF_METHODS="dpo pdpo_cluster", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 4))
    res = subprocess.run(["bash", str(RECIPES / "smollm2_dsp_defaults.sh"), str(src), str(tmp_path / "out")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "unknown method 'pdpo_cluster'" in res.stderr
    assert not (tmp_path / "out" / "dpo").exists()  # checked before any training


def test_smollm2_dsp_rm_defaults_recipe_runs_on_a_tiny_file(tmp_path):
    """The newcomer's reward model: a P-RM and a vanilla reward model at the defaults, side by side."""
    src = tmp_path / "dsp.json"
    src.write_text(json.dumps(dsp_rows() * 4))
    env = dict(os.environ, PRLHF_RECIPE_OVERRIDES=SHELL_FAST,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(RECIPES / "smollm2_dsp_rm_defaults.sh"), str(src), str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"rm_uniform", "prm_individual"}
    assert report["methods"]["rm_uniform"]["flip_rate"] == 0.0
    assert json.loads((out / "prm_individual" / "prlhf_config.json").read_text())["user_position"] == "after_response"
