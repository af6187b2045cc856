"""PDPOTrainer / PSFTTrainer: gradients reach the right user rows, training learns per-user
preferences, checkpoints resume exactly, metrics carry TRL's names."""

import json
from pathlib import Path

import pytest
import torch
from conftest import two_user_records

from prlhf.base_models import tiny_llama
from prlhf.config import PDPOConfig, PersonalizationConfig, PSFTConfig
from prlhf.evaluation import evaluate_accuracy
from prlhf.modeling import PersonalizedLM
from prlhf.trainers.base import latest_checkpoint
from prlhf.trainers.pdpo import PDPOTrainer
from prlhf.trainers.sft import PSFTTrainer
from prlhf.users import UserRegistry


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True,
                per_device_train_batch_size=4, learning_rate=1e-3, n_user_tokens=2, save_strategy="no",
                logging_steps=1, train_sampling_strategy="sequential", weight_decay=0.0)
    base.update(kw)
    return PDPOConfig(**base)


def model_for(user_model, users, **cfg):
    llm, tok = tiny_llama()
    config = PersonalizationConfig("tiny-llama", user_model=user_model, n_user_tokens=2, **cfg)
    return PersonalizedLM.build(config, UserRegistry(users), llm=llm, tokenizer=tok)


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_one_step_on_user_a_changes_only_a_and_shared_parts(tmp_path, kind):
    records = [r for r in two_user_records(n_prompts=2, users=("a", "b")) if r["user_id"] == "a"]
    model = model_for(kind, ["a", "b", "c"], n_clusters=3)
    before = {k: v.detach().clone() for k, v in model.user_model.state_dict().items()}
    trainer = PDPOTrainer(model=model, args=args(tmp_path, max_steps=1, user_model=kind), train_dataset=records)
    trainer.train()
    after = model.user_model.state_dict()
    if kind == "individual":
        moved = (after["offsets"] - before["offsets"]).abs().sum(dim=(1, 2))  # rows a, b, c (row 0 has no offset)
        assert moved[0] > 0, "user a's offset did not move"
        assert moved[1] == 0 and moved[2] == 0, "other users' offsets moved"
        assert not torch.equal(after["generic"], before["generic"]), "e_0 did not move"
    else:
        moved = (after["user_logits"] - before["user_logits"]).abs().sum(dim=1)  # rows generic, a, b, c
        assert moved[0] > 0 and moved[1] > 0, "the generic user's and a's weights must move"
        assert moved[2] == 0 and moved[3] == 0, "other users' weights moved"
        assert not torch.equal(after["clusters"], before["clusters"])


def test_alpha_one_leaves_generic_user_untouched(tmp_path):
    """alpha = 1: no generic term, so the generic user's cluster weights get no gradient."""
    records = [r for r in two_user_records(n_prompts=2, users=("a", "b")) if r["user_id"] == "a"]
    model = model_for("cluster", ["a", "b"], n_clusters=3)
    before = model.user_model.user_logits.detach().clone()
    trainer = PDPOTrainer(model=model, args=args(tmp_path, max_steps=1, alpha=1.0, user_model="cluster"), train_dataset=records)
    assert trainer.terms_needed(model) == (True, False)
    trainer.train()
    assert torch.equal(model.user_model.user_logits[0], before[0])
    assert not torch.equal(model.user_model.user_logits[1], before[1])


def test_pdpo_learns_opposite_preferences_and_vanilla_cannot(tmp_path):
    records = two_user_records(n_prompts=24)
    results = {}
    for kind in ("individual", "none"):
        a = args(tmp_path / kind, num_train_epochs=3, per_device_train_batch_size=8, user_model=kind,
                 n_user_tokens=4, user_learning_rate=1e-2, train_sampling_strategy="random", logging_steps=100)
        trainer = PDPOTrainer(args=a, train_dataset=records)
        trainer.train()
        results[kind] = evaluate_accuracy(trainer.model, records, trainer.reference_for_eval())["accuracy"]
    assert results["individual"]["per_user"]["long_fan"] >= 0.9
    assert results["individual"]["per_user"]["short_fan"] >= 0.9
    # vanilla DPO sees every prompt with both labels: it cannot beat 0.5 on both users at once
    assert min(results["none"]["per_user"].values()) <= 0.6


def test_logs_use_trl_metric_names_and_per_user_accuracy(tmp_path):
    records = two_user_records(n_prompts=4)
    trainer = PDPOTrainer(args=args(tmp_path, max_steps=2), train_dataset=records, eval_dataset=records[:4])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "rewards_generic/accuracies"]:
        assert key in logs[0], key
    assert any(k.startswith("rewards/accuracies_user/") for k in logs[0])
    ev = trainer.evaluate()
    assert "eval_loss" in ev and "eval_rewards/accuracies" in ev


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    records = two_user_records(n_prompts=8)
    full = PDPOTrainer(args=args(tmp_path / "full", max_steps=4), train_dataset=records)
    full.train()
    interrupted = PDPOTrainer(args=args(tmp_path / "cut", max_steps=4, save_strategy="steps", save_steps=2),
                              train_dataset=records)
    interrupted.train()
    out = Path(tmp_path / "cut" / "out")
    assert latest_checkpoint(out).endswith("checkpoint-4")
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # a checkpoint cut off while being written
    assert latest_checkpoint(out).endswith("checkpoint-2")
    resumed = PDPOTrainer(args=args(tmp_path / "cut", max_steps=4), train_dataset=records)
    resumed.train(resume_from_checkpoint=True)
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    ckpt = out / "checkpoint-2"
    assert (ckpt / "user_model.safetensors").is_file() and (ckpt / "model.safetensors").is_file()
    assert not list(ckpt.glob("pytorch_model*.bin"))  # weights as safetensors only


def test_save_model_writes_a_loadable_model(tmp_path):
    records = two_user_records(n_prompts=4)
    trainer = PDPOTrainer(args=args(tmp_path, max_steps=1, user_model="cluster", n_clusters=2), train_dataset=records)
    trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    cfg = json.loads((out / "prlhf_config.json").read_text())
    assert cfg["user_model"] == "cluster" and cfg["reference_model_name_or_path"] == "tiny-llama"
    assert json.loads((out / "users.json").read_text())["users"] == ["long_fan", "short_fan"]
    loaded = PersonalizedLM.from_pretrained(out)
    m1 = evaluate_accuracy(trainer.model, records, trainer.reference_for_eval())
    m2 = evaluate_accuracy(loaded, records, tiny_llama()[0])
    assert [p["margin"] for p in m1["pairs"]] == pytest.approx([p["margin"] for p in m2["pairs"]], abs=1e-5)


def test_lora_training_uses_disabled_adapters_as_reference(tmp_path):
    records = two_user_records(n_prompts=4)
    trainer = PDPOTrainer(args=args(tmp_path, max_steps=2, use_lora=True, lora_r=4), train_dataset=records)
    assert trainer.reference_model is None  # no second copy of the weights
    trainer.train()
    trainer.save_model()
    out = Path(trainer.args.output_dir)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    loaded = PersonalizedLM.from_pretrained(out)
    m1 = evaluate_accuracy(trainer.model, records, None)
    m2 = evaluate_accuracy(loaded, records, None)
    assert [p["margin"] for p in m1["pairs"]] == pytest.approx([p["margin"] for p in m2["pairs"]], abs=1e-5)
    # the adapters themselves moved (LoRA B starts at zero), not only the soft prompt
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max().item() for p in lora_b) > 0
    # and the policy with the user prefix removed differs from the reference: the LLM itself changed
    generic_only = evaluate_accuracy(trainer.model, [dict(r, user_id=None) for r in records], None)
    assert any(abs(p["margin"]) > 1e-4 for p in generic_only["pairs"])


def test_sft_lowers_nll_of_chosen(tmp_path):
    records = two_user_records(n_prompts=8)
    cfg = PSFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", use_cpu=True, disable_tqdm=True,
                     per_device_train_batch_size=8, learning_rate=5e-3, num_train_epochs=8, save_strategy="no",
                     logging_steps=1)
    trainer = PSFTTrainer(args=cfg, train_dataset=records)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    out = trainer.save_final()
    from prlhf.base_models import load_model_and_tokenizer

    llm, _ = load_model_and_tokenizer(out)  # a plain model folder, usable as model_name_or_path
    assert sum(p.numel() for p in llm.parameters()) == sum(p.numel() for p in tiny_llama()[0].parameters())


def test_sft_response_only_head_gives_the_full_logits_loss_and_gradients(tmp_path):
    from peft import LoraConfig, get_peft_model

    records = two_user_records(n_prompts=3)
    for lora in (False, True):
        llm, tok = tiny_llama()
        if lora:
            llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
        cfg = PSFTConfig(output_dir=str(tmp_path / f"sft{lora}"), report_to="none", use_cpu=True, disable_tqdm=True,
                         per_device_train_batch_size=8, save_strategy="no")
        trainer = PSFTTrainer(model=llm, args=cfg, train_dataset=records, processing_class=tok)
        batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset))
        grads = {}
        for fast in (True, False):
            trainer.args.response_logits_only = fast
            llm.zero_grad()
            loss = trainer.compute_loss(llm, batch)
            loss.backward()
            grads[fast] = (loss.item(), {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None})
        assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-5)
        assert grads[True][1].keys() == grads[False][1].keys() and grads[True][1]
        for n, g in grads[True][1].items():
            assert torch.allclose(g, grads[False][1][n], atol=1e-5), n


def test_user_id_in_prompt_baseline_trains_saves_and_scores_the_tagged_prompt(tmp_path):
    """The baseline people build with TRL today: no user model, the user id written into the prompt.
    The saved model keeps the template, so evaluation and generation tag prompts the same way; its
    scores equal a vanilla model scoring the tagged prompt text."""
    records = two_user_records(n_prompts=4)
    trainer = PDPOTrainer(args=args(tmp_path, user_model="none", user_id_in_prompt=True, max_steps=3),
                          train_dataset=records)
    trainer.train()
    trainer.save_model()
    loaded = PersonalizedLM.from_pretrained(trainer.args.output_dir)
    assert loaded.user_model is None and loaded.prlhf_config.user_id_prompt == "[user: {user_id}]\n"
    from prlhf.reference import load_reference

    ref = load_reference(loaded)  # the recorded pi_SFT: the tiny-llama base
    rec = records[0]
    own = evaluate_accuracy(loaded, [rec], ref)["pairs"][0]["margin"]
    other = evaluate_accuracy(loaded, [dict(rec, user_id="short_fan")], ref)["pairs"][0]["margin"]
    assert abs(own - other) > 1e-6  # another id, another prompt, another score
    template = loaded.prlhf_config.user_id_prompt
    loaded.prlhf_config.user_id_prompt = None  # now a plain model: the tag must be in the text itself
    tagged = dict(rec, prompt=template.format(user_id=rec["user_id"]) + rec["prompt"], user_id=None)
    assert evaluate_accuracy(loaded, [tagged], ref)["pairs"][0]["margin"] == pytest.approx(own, abs=1e-5)


def test_alpha_sampling_scores_each_pair_under_the_drawn_term(tmp_path, monkeypatch):
    """alpha_sampling: a pair drawn for the user term has exactly the full objective's user-term
    loss, a pair drawn for the generic term its generic-term loss; so the expected loss is the alpha mix."""

    records = two_user_records(n_prompts=2)  # 4 pairs of two users
    model = model_for("individual", ["long_fan", "short_fan"], user_offset_init="vocab")
    trainer = PDPOTrainer(model=model, args=args(tmp_path, max_steps=1, sft_weight=0.3, alpha=0.3), train_dataset=records)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    full, _ = trainer.pdpo_loss(model, batch)
    user_terms = trainer._last_terms["user term of the loss"]
    generic_terms = trainer._last_terms["generic term of the loss"]
    assert torch.allclose(full, (0.3 * user_terms + 0.7 * generic_terms).mean())
    trainer.args.alpha_sampling = True
    draws = torch.tensor([0.1, 0.9, 0.5, 0.2])  # < alpha: user term for pairs 0 and 3
    monkeypatch.setattr(torch, "rand", lambda n, device=None: draws[:n])
    sampled, metrics = trainer.pdpo_loss(model, batch)
    pick = torch.tensor([True, False, False, True])
    expected = torch.where(pick, user_terms, generic_terms)
    assert torch.allclose(trainer._last_terms["sampled terms of the loss"], expected, atol=1e-6)
    assert torch.allclose(sampled, expected.mean(), atol=1e-6)
    assert len(metrics["_hits"][0]) == 2  # per-user accuracy counts the user-term pairs only
    model.eval()  # evaluation runs both terms whatever alpha_sampling says
    exact, _ = trainer.pdpo_loss(model, batch)
    assert torch.allclose(exact, full, atol=1e-6)


def test_alpha_sampling_learns_opposite_preferences(tmp_path):
    records = two_user_records(n_prompts=24)
    # twice the epochs of the full objective above: the same number of term evaluations
    a = args(tmp_path, num_train_epochs=6, per_device_train_batch_size=8, user_model="individual", alpha_sampling=True,
             n_user_tokens=4, user_learning_rate=1e-2, train_sampling_strategy="random", logging_steps=100)
    trainer = PDPOTrainer(args=a, train_dataset=records)
    trainer.train()
    acc = evaluate_accuracy(trainer.model, records, trainer.reference_for_eval())["accuracy"]["per_user"]
    assert acc["long_fan"] >= 0.9 and acc["short_fan"] >= 0.9


def test_private_trainer_methods_we_override_keep_their_signatures():
    """prlhf overrides four private ``transformers.Trainer`` methods (a model folder is not one state
    dict; the lazily updated per-user rows have sparse gradients) and calls ``Trainer._save``; they
    were checked against transformers 5.24. A transformers release that renames or re-signs them
    must fail here, loudly, not change training silently."""
    import inspect

    from transformers import Trainer

    expected = {"_load_from_checkpoint": ["self", "resume_from_checkpoint", "model"], "_load_best_model": ["self"],
                "_clip_grad_norm": ["self", "model"], "_get_grad_norm": ["self", "model", "grad_norm"],
                "_save": ["self", "output_dir", "state_dict"]}
    for name, params in expected.items():
        assert hasattr(Trainer, name), f"transformers.Trainer.{name} is gone: prlhf's override no longer runs"
        assert list(inspect.signature(getattr(Trainer, name)).parameters) == params, name
