"""P-RM (prlhf.reward_model, prlhf.trainers.prm): hand-computed BT loss and its alpha mixture, padding-invariant last-token
pick, a P-RM with no user model equals TRL's RewardTrainer loss, uniform ignores alpha, training
learns opposite users where a vanilla RM cannot, save / load / resume, alpha_sampling."""

import json
import math

import pytest
import torch
from conftest import build_model, collate, two_user_records

from prlhf.base_models import tiny_llama
from prlhf.config import PersonalizationConfig, PRMConfig
from prlhf.losses import bradley_terry_loss, prm_loss
from prlhf.modeling import PersonalizedLM
from prlhf.reward_model import PersonalizedRewardModel, evaluate_reward_accuracy, last_token_index
from prlhf.trainers.base import latest_checkpoint
from prlhf.trainers.prm import PRMTrainer
from prlhf.users import UserRegistry


def rm_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "rm"), report_to="none", use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=4, learning_rate=1e-3, n_user_tokens=2, save_strategy="no", logging_steps=1,
                train_sampling_strategy="sequential", weight_decay=0.0, model_name_or_path="tiny-llama")
    base.update(kw)
    return PRMConfig(**base)


def reward_model(user_model="individual", users=("long_fan", "short_fan"), **cfg) -> PersonalizedRewardModel:
    llm, tok = tiny_llama()
    config = PersonalizationConfig("tiny-llama", user_model=user_model, n_user_tokens=2, **cfg)
    torch.manual_seed(0)
    return PersonalizedRewardModel(PersonalizedLM.build(config, UserRegistry(users), llm=llm, tokenizer=tok))


def test_bt_loss_and_mixture_by_hand():
    rw, rl = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.allclose(bradley_terry_loss(rw, rl), torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(1))]))
    gw, gl = torch.tensor([0.5, 0.5]), torch.tensor([0.5, -0.5])
    mixed = prm_loss((rw, rl), (gw, gl), 0.25)
    by_hand = [0.25 * math.log(1 + math.exp(-1)) + 0.75 * math.log(2),
               0.25 * math.log(1 + math.exp(1)) + 0.75 * math.log(1 + math.exp(-1))]
    assert torch.allclose(mixed, torch.tensor(by_hand))
    centred = prm_loss((rw, rl), None, 1.0, center_coefficient=0.1)
    assert torch.allclose(centred, torch.tensor([math.log(1 + math.exp(-1)) + 0.1 * 9, math.log(1 + math.exp(1)) + 0.1]))


def test_last_token_index_and_rewards_do_not_depend_on_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]
    rm = PersonalizedRewardModel(build_model("individual", users=("long_fan", "short_fan")))
    rm.eval()
    records = two_user_records(n_prompts=3)
    right, left = collate(rm.plm, records, side="right"), collate(rm.plm, records, side="left")
    assert not torch.equal(right["attention_mask"], left["attention_mask"])  # really padded differently
    with torch.no_grad():
        r1 = rm.batch_rewards(right, right["user_rows"])
        r2 = rm.batch_rewards(left, left["user_rows"])
        # and equal to each sequence scored alone, without any padding
        alone = [rm(right["input_ids"][i:i + 1, : int(right["attention_mask"][i].sum())],
                    right["attention_mask"][i:i + 1, : int(right["attention_mask"][i].sum())],
                    right["implicit_mask"][i:i + 1, : int(right["attention_mask"][i].sum())],
                    right["user_rows"].repeat(2)[i:i + 1]) for i in range(r1.shape[0])]
    assert torch.allclose(r1, r2, atol=1e-5)
    assert torch.allclose(r1, torch.cat(alone), atol=1e-5)


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_no_user_model_equals_trl_reward_trainer_loss(tmp_path, center):
    """The same backbone and head weights in a LlamaForSequenceClassification: TRL's RewardTrainer
    loss on the same token batch equals the P-RM loss (user model none) for every alpha."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    records = two_user_records(n_prompts=4)
    rm = reward_model("none")
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.5)
    llm = rm.plm.llm
    config = llm.config.__class__(**{**llm.config.to_dict(), "num_labels": 1})
    classifier = LlamaForSequenceClassification(config)
    classifier.model.load_state_dict(llm.model.state_dict())
    with torch.no_grad():
        classifier.score.weight.copy_(rm.head.weight)
    ds = Dataset.from_list([{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in records])
    trl = RewardTrainer(model=classifier, args=RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                                                            bf16=False, center_rewards_coefficient=center or None),
                        train_dataset=ds, processing_class=rm.tokenizer)
    for alpha in (1.0, 0.3):
        ours = PRMTrainer(model=rm, args=rm_args(tmp_path, alpha=alpha, user_model="none",
                                                 center_rewards_coefficient=center), train_dataset=records)
        batch = ours.data_collator(ours.train_dataset)
        assert rm.tokenizer.pad_token_id not in batch["input_ids"][batch["attention_mask"].bool()]
        with torch.no_grad():
            got, _ = ours.pair_loss(rm, batch)
            expected = trl.compute_loss(classifier, {"input_ids": batch["input_ids"],
                                                     "attention_mask": batch["attention_mask"]})
        assert abs(expected.item() - math.log(2)) > 1e-2  # the head is not degenerate
        assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_uniform_reward_model_ignores_alpha_even_with_both_terms_run(tmp_path, monkeypatch):
    records = two_user_records(n_prompts=2)
    rm = reward_model("uniform")
    losses = {}
    for alpha in (1.0, 0.3, 0.0):
        trainer = PRMTrainer(model=rm, args=rm_args(tmp_path, alpha=alpha, user_model="uniform"), train_dataset=records)
        batch = trainer.data_collator(trainer.train_dataset)
        with torch.no_grad():
            losses[alpha] = trainer.pair_loss(rm, batch)[0].item()
            monkeypatch.setattr(type(rm.plm.user_model), "depends_on_user", True, raising=False)
            both = trainer.pair_loss(rm, batch)[0].item()  # both terms really run and mixed by alpha
            monkeypatch.undo()
        assert both == pytest.approx(losses[alpha], abs=1e-6)
    assert losses[0.3] == pytest.approx(losses[1.0], abs=1e-6) and losses[0.0] == pytest.approx(losses[1.0], abs=1e-6)


def test_alpha_sampling_scores_each_pair_under_the_drawn_term(tmp_path, monkeypatch):

    records = two_user_records(n_prompts=2)  # 4 pairs of two users
    rm = reward_model("individual", user_offset_init="vocab")
    trainer = PRMTrainer(model=rm, args=rm_args(tmp_path, alpha=0.3), train_dataset=records)
    batch = trainer.data_collator(trainer.train_dataset)
    B = batch["user_rows"].shape[0]
    with torch.no_grad():
        user = rm.batch_rewards(batch, batch["user_rows"])
        generic = rm.batch_rewards(batch, torch.zeros_like(batch["user_rows"]))
        user_terms = bradley_terry_loss(user[:B], user[B:])
        generic_terms = bradley_terry_loss(generic[:B], generic[B:])
        rm.train()
        full, _ = trainer.pair_loss(rm, batch)
        assert torch.allclose(full, (0.3 * user_terms + 0.7 * generic_terms).mean(), atol=1e-6)
        trainer.args.alpha_sampling = True
        draws = torch.tensor([0.1, 0.9, 0.5, 0.2])  # < alpha: the user term for pairs 0 and 3
        monkeypatch.setattr(torch, "rand", lambda n, device=None: draws[:n])
        sampled, metrics = trainer.pair_loss(rm, batch)
    pick = torch.tensor([True, False, False, True])
    assert torch.allclose(sampled, torch.where(pick, user_terms, generic_terms).mean(), atol=1e-6)
    assert len(metrics["_hits"][0]) == 2


@pytest.mark.parametrize("position", ["prefix", "after_response"])
def test_prm_learns_opposite_users_and_vanilla_rm_cannot(tmp_path, position):
    records = two_user_records(n_prompts=24)
    acc = {}
    for kind in ("individual", "uniform"):
        a = rm_args(tmp_path / kind, num_train_epochs=3, per_device_train_batch_size=8, user_model=kind, n_user_tokens=4,
                    user_learning_rate=1e-2, train_sampling_strategy="random", logging_steps=100, user_position=position)
        trainer = PRMTrainer(args=a, train_dataset=records)
        trainer.train()
        acc[kind] = evaluate_reward_accuracy(trainer.model, records)["accuracy"]
    assert acc["individual"]["per_user"]["long_fan"] >= 0.9 and acc["individual"]["per_user"]["short_fan"] >= 0.9
    assert min(acc["uniform"]["per_user"].values()) <= 0.6  # one reward for everybody: the users' labels conflict
    assert acc["uniform"]["generic"] == acc["uniform"]["seen"]


def test_metrics_shape_matches_prlhf_eval(tmp_path):
    records = two_user_records(n_prompts=3)
    unseen = [dict(r, user_id="stranger") for r in two_user_records(n_prompts=2, seed=5)]
    m = evaluate_reward_accuracy(reward_model("individual", user_offset_init="vocab"), records + unseen)
    assert m["n_pairs"] == len(records) + len(unseen)
    assert set(m["accuracy"]) >= {"overall", "seen", "generic", "unseen", "per_user", "ci", "per_user_mean"}
    assert set(m["accuracy"]["per_user"]) == {"long_fan", "short_fan", "stranger"}
    assert m["n"] == {"seen": len(records), "unseen": len(unseen)}
    # the margins are the rewards' differences, as score() gives them
    rm = reward_model("individual", user_offset_init="vocab")
    r = records[0]
    rc, rr = rm.score([r["prompt"]] * 2, [r["chosen"], r["rejected"]], [r["user_id"]] * 2)
    assert m["pairs"][0]["margin"] == pytest.approx(rc - rr, abs=1e-5)


def test_save_load_and_resume(tmp_path):
    records = two_user_records(n_prompts=4)
    full = PRMTrainer(args=rm_args(tmp_path / "full", max_steps=4, user_model="cluster", n_clusters=2), train_dataset=records)
    full.train()
    cut = PRMTrainer(args=rm_args(tmp_path / "cut", max_steps=4, user_model="cluster", n_clusters=2, save_strategy="steps",
                                  save_steps=2), train_dataset=records)
    cut.train()
    out = tmp_path / "cut" / "rm"
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # cut off while being written
    assert latest_checkpoint(out).endswith("checkpoint-2")
    assert (out / "checkpoint-2" / "reward_head.safetensors").is_file()
    resumed = PRMTrainer(args=rm_args(tmp_path / "cut", max_steps=4, user_model="cluster", n_clusters=2), train_dataset=records)
    resumed.train(resume_from_checkpoint=True)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    full.save_model()
    folder = tmp_path / "full" / "rm"
    assert "reward_head.safetensors" in json.loads((folder / "manifest.json").read_text())["files"]
    assert "p-rm" in (folder / "README.md").read_text()
    loaded = PersonalizedRewardModel.from_pretrained(folder)
    prompts, responses, users = [r["prompt"] for r in records], [r["chosen"] for r in records], [r["user_id"] for r in records]
    assert loaded.score(prompts, responses, users) == pytest.approx(full.model.score(prompts, responses, users), abs=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_save_writes_a_given_state_dict(tmp_path, lora):
    """A sharded run (FSDP, DeepSpeed) passes the weights it gathered from the shards: those are the
    ones written (LLM or LoRA adapter, user model, head), not the module's own."""
    model = reward_model(use_lora=lora)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    changed = [k for k, v in state.items() if k.startswith("head.") or "user_model" in k or ("lora_B" in k if lora else
                                                                                             "layers.0.mlp" in k)]
    for k in changed:
        state[k] += 0.25
    model.save_pretrained(tmp_path / "rm", state_dict=state)
    loaded = PersonalizedRewardModel.from_pretrained(tmp_path / "rm").state_dict()
    assert len(changed) >= 3 and {k for k in changed if k in loaded} == set(changed)
    for k in changed:
        assert torch.allclose(loaded[k], state[k]), k
        assert not torch.allclose(loaded[k], model.state_dict()[k]), k


def test_a_policy_folder_is_not_a_reward_model(tmp_path):
    build_model("individual").save_pretrained(tmp_path / "policy")
    with pytest.raises(FileNotFoundError, match="not a reward model"):
        PersonalizedRewardModel.from_pretrained(tmp_path / "policy")


def test_cli_rm_train_eval_score(tmp_path, capsys):
    import yaml
    from test_cli import write_jsonl

    from prlhf.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", two_user_records(n_prompts=16))
    test = write_jsonl(tmp_path / "test.jsonl", two_user_records(n_prompts=4, seed=1) + [
        dict(r, user_id="newcomer") for r in two_user_records(n_prompts=2, seed=2, users=("long_x",))])
    out = tmp_path / "prm"
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny-llama", "train_file": str(train), "output_dir": str(out),
                                   "user_model": "individual", "n_user_tokens": 4, "learning_rate": 1e-3, "beta": 0.1,
                                   "user_learning_rate": 1e-2, "per_device_train_batch_size": 8, "num_train_epochs": 1,
                                   "save_strategy": "no", "report_to": "none", "disable_tqdm": True, "use_cpu": True}))
    assert main(["rm", "train", "--config", str(cfg), "--num_train_epochs", "3"]) == 0
    assert json.loads((out / "training_args.json").read_text())["num_train_epochs"] == 3  # the flag won
    # a policy next to the reward model: scored by its implicit reward, in the same table
    policy = tmp_path / "policy"
    build_model("individual", users=("long_fan", "short_fan")).save_pretrained(policy)
    metrics = tmp_path / "metrics.json"
    assert main(["rm", "eval", "--model", str(out), "--model", str(policy), "--data", str(test), "--output", str(metrics),
                 "--report", str(tmp_path / "rep"), "--reference", "tiny-llama"]) == 0
    m = json.loads(metrics.read_text())["models"]
    assert m["prm"]["scored_as"] == "reward model" and m["policy"]["scored_as"] == "policy (implicit reward)"
    acc = m["prm"]["accuracy"]
    assert m["prm"]["n_pairs"] == 10 and m["prm"]["n"] == {"seen": 8, "unseen": 2}
    assert set(acc["per_user"]) == {"long_fan", "short_fan", "newcomer"} and acc["seen"] >= 0.9
    assert m["policy"]["accuracy_difference"]["vs"] == "prm"
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["rm", "eval", "--model", str(out), "--data", str(test), "--output", str(metrics)]) == 0
    assert set(json.loads(metrics.read_text())) >= {"n_pairs", "accuracy"}  # one model: prlhf eval's shape

    long, short = " " + " ".join(["the", "big", "dog", "runs", "fast"] * 3), " big sun"
    table = [(long, "long_fan"), (short, "long_fan"), (long, "short_fan"), (short, "short_fan"), (long, "stranger")]
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "Q: the dog\nA:", "response": r, "user_id": u, "extra": i}
                                                 for i, (r, u) in enumerate(table)])
    scored = tmp_path / "scored.jsonl"
    assert main(["rm", "score", "--model", str(out), "--input", str(rows), "--output", str(scored)]) == 0
    got = [json.loads(line) for line in scored.read_text().splitlines()]
    rm = PersonalizedRewardModel.from_pretrained(out)
    expected = rm.score(["Q: the dog\nA:"] * 5, [r for r, _ in table], [u if u != "stranger" else None for _, u in table])
    assert [g["reward"] for g in got] == pytest.approx(expected, abs=1e-5)
    assert [g["extra"] for g in got] == [0, 1, 2, 3, 4]
    # each user's reward ranks the answers its own way (rewards compare within a user, not across users)
    assert got[0]["reward"] > got[1]["reward"] and got[3]["reward"] > got[2]["reward"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "response": "A"}, {"prompt": "Q"}])
    capsys.readouterr()
    assert main(["rm", "score", "--model", str(out), "--input", str(bad), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl: record 1 (line 2): field 'response'" in capsys.readouterr().err
    assert main(["rm", "eval", "--model", str(policy), "--data", str(test), "--reference", "tiny-llama"]) == 0
    capsys.readouterr()
    assert main(["rm", "score", "--model", str(policy), "--input", str(rows), "--output", str(tmp_path / "y.jsonl")]) == 2
    assert "not a reward model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory):
    """A P-RM that has learned two opposite users (long answers vs short ones), saved."""
    tmp = tmp_path_factory.mktemp("prm")
    a = rm_args(tmp, num_train_epochs=3, per_device_train_batch_size=8, n_user_tokens=4, user_learning_rate=1e-2,
                train_sampling_strategy="random", logging_steps=100, health_eval_pairs=0)
    trainer = PRMTrainer(args=a, train_dataset=two_user_records(n_prompts=24))
    trainer.train()
    trainer.save_model()
    return tmp / "rm"


def test_best_of_n_picks_the_users_highest_reward(trained_prm):
    from prlhf.best_of_n import best_of_n, rerank

    rm = PersonalizedRewardModel.from_pretrained(trained_prm)
    policy = PersonalizedLM.from_pretrained_or_plain("tiny-llama")  # any causal LM
    assert policy.user_model is None
    prompts = [r["prompt"] for r in two_user_records(n_prompts=4, seed=3)[::2]]
    torch.manual_seed(0)
    rows = best_of_n(policy, rm, prompts, ["long_fan"] * len(prompts), n=5, batch_size=3, max_new_tokens=12)
    texts = [c["response"] for row in rows for c in row["candidates"]]
    assert len(texts) == 5 * len(prompts) and len(set(texts)) > len(prompts)  # sampled, not greedy
    expected = rm.score([p for p in prompts for _ in range(5)], texts, ["long_fan"] * len(texts))
    assert [c["reward"] for row in rows for c in row["candidates"]] == pytest.approx(expected, abs=1e-5)
    for row in rows:
        assert row["reward"] == max(c["reward"] for c in row["candidates"])
        assert row["response"] == max(row["candidates"], key=lambda c: c["reward"])["response"]
    # the same candidates, two users: each gets the length it prefers
    short, mid, long = " big sun", " the dog runs fast", " " + " ".join(["the", "big", "dog", "runs", "fast"] * 3)
    picks = {u: rerank(rm, prompts, [u] * len(prompts), [[mid, long, short]] * len(prompts))
             for u in ("long_fan", "short_fan")}
    assert [p["response"] for p in picks["long_fan"]] == [long] * len(prompts)
    assert [p["response"] for p in picks["short_fan"]] == [short] * len(prompts)


def test_cli_generate_best_of(trained_prm, tmp_path):
    from test_cli import write_jsonl

    from prlhf.cli import main

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: the dog\nA:", "user_id": "long_fan"},
                                                 {"prompt": "Q: the sun\nA:", "user_id": "short_fan", "k": 1}])
    out = tmp_path / "best.jsonl"
    assert main(["generate", "--model", "tiny-llama", "--input", str(prompts), "--output", str(out), "--best-of", "3",
                 "--reward-model", str(trained_prm), "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user_id"] for r in rows] == ["long_fan", "short_fan"] and rows[1]["k"] == 1
    for r in rows:
        assert len(r["candidates"]) == 3 and r["reward"] == max(c["reward"] for c in r["candidates"])
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Q", "--best-of", "3"]) == 2  # no --reward-model


def test_trl_grpo_with_the_personalized_reward_function(trained_prm, tmp_path):
    """A few GRPO steps of TRL on tiny-llama with the P-RM as its reward function: TRL passes the
    user_id column, the rewards are each completion's reward for its user, and the per-user means
    reach TRL's logs."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from prlhf.best_of_n import PersonalizedRewardFunction

    rm = PersonalizedRewardModel.from_pretrained(trained_prm)
    reward = PersonalizedRewardFunction(rm)
    calls = []

    def recorded(prompts, completions, **kwargs):
        out = reward(prompts, completions, **kwargs)
        calls.append((list(prompts), list(completions), list(kwargs["user_id"]), out))
        return out

    recorded.__name__ = "prm"
    records = two_user_records(n_prompts=4, seed=7)
    ds = Dataset.from_list([{"prompt": r["prompt"], "user_id": r["user_id"]} for r in records])
    llm, tok = tiny_llama()
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, max_steps=2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                      save_strategy="no", disable_tqdm=True, learning_rate=1e-4)
    trainer = GRPOTrainer(model=llm, reward_funcs=[recorded], args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    assert calls
    for prompts, completions, users, out in calls:
        assert len(out) == len(prompts) == len(users)
        assert out == pytest.approx(rm.score(prompts, completions, users), abs=1e-4)
    logs = [h for h in trainer.state.log_history if "rewards/prm/mean" in h]
    assert logs
    first = calls[0]
    for u in set(first[2]):
        mine = [r for r, uu in zip(first[3], first[2]) if uu == u]
        assert logs[0][f"prm/user/{u}"] == pytest.approx(sum(mine) / len(mine), abs=1e-4)


def test_after_response_layout_puts_the_user_last_and_cannot_generate(tmp_path):
    from prlhf.layout import build_sequence

    ids, labels, implicit, user = build_sequence([1, 10, 11], [20, 21], [30], 2, 1, 0, "after_response")
    assert ids == [1, 10, 11, 20, 21, 0, 0, 30] and labels == [-100] * 3 + [20, 21] + [-100] * 3
    assert implicit == [False] * 5 + [True, True, False] and user == [False] * 5 + [True] * 3
    rm = reward_model("individual", user_offset_init="vocab", user_position="after_response")
    rm.eval()
    records = two_user_records(n_prompts=3)
    right, left = collate(rm.plm, records, side="right"), collate(rm.plm, records, side="left")
    with torch.no_grad():
        r1, r2 = rm.batch_rewards(right, right["user_rows"]), rm.batch_rewards(left, left["user_rows"])
        other = rm.batch_rewards(right, 3 - right["user_rows"])  # the other user
    assert torch.allclose(r1, r2, atol=1e-5) and not torch.allclose(r1, other, atol=1e-3)
    with pytest.raises(ValueError, match="cannot generate"):
        rm.plm.prepare_prompts(["Q"], ["long_fan"])
    with pytest.raises(ValueError, match="user_position"):
        from prlhf.config import PDPOConfig

        PDPOConfig(output_dir=str(tmp_path / "x"), user_position="after_response")  # a policy cannot read it


def test_reward_demo_writes_its_report(tmp_path):
    from prlhf.experiments.reward_demo import check_reward_findings, run_reward_demo

    report = run_reward_demo(tmp_path / "rd", n_users=4, unseen_users=2, pairs_per_user=8, n_prompts=20, sft_epochs=1,
                             num_train_epochs=1, prompts_per_user=1, best_of=2, max_new_tokens=8)
    saved = json.loads((tmp_path / "rd" / "report.json").read_text())
    assert set(saved["methods"]) == {"rm_uniform", "prm_individual"} and saved["best_of"] == 2
    for m in saved["methods"].values():
        assert set(m["accuracy"]) >= {"seen", "generic", "unseen"} and "unseen" in m["length"]
    assert saved["methods"]["rm_uniform"]["accuracy"]["seen"] == saved["methods"]["rm_uniform"]["accuracy"]["generic"]
    picks = [json.loads(line) for line in (tmp_path / "rd" / "best_of_2_prm_individual.jsonl").read_text().splitlines()]
    assert picks and all(len(p["candidates"]) == 2 for p in picks)
    assert set(check_reward_findings(report)) >= {"P-RM seen accuracy >= 0.95", "P-RM best-of-n: minority words <= 0.5 x majority"}
