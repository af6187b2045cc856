"""The fast paths (issue 5) against the plain reference computation.

Plain reference: one padded row per response, a 2D attention mask, full logits and log-softmax at
every position (``conftest.plain_logps`` / ``plain_reference_logps``). Fast paths: shared-prompt
packing with a 4D mask, the LM head at response positions only, one forward for all P-DPO terms,
reference log-probs precomputed once and cached on disk. Each must give the same log-probs, loss
and gradients (relative difference at most 1e-4).
"""

import copy
from pathlib import Path

import pytest
import torch
from conftest import RECS, build_model, plain_logps, plain_reference_logps, rel, two_user_records

from prlhf.base_models import tiny_llama
from prlhf.collate import PreferenceCollator
from prlhf.config import PDPOConfig, PersonalizationConfig
from prlhf.data import TokenizeSettings, load_preference_data, tokenize_dataset
from prlhf.losses import personalized_loss, preference_loss
from prlhf.modeling import PersonalizedLM
from prlhf.reference import reference_pair_logps
from prlhf.scoring import packed_attention
from prlhf.trainers.pdpo import PDPOTrainer
from prlhf.users import UserRegistry


def examples_for(model, records=RECS, **settings):
    s = TokenizeSettings(n_user_tokens=model.n_implicit_tokens, max_user_text_tokens=model.prlhf_config.max_user_text_tokens,
                         **settings)
    return tokenize_dataset(load_preference_data(records), model.tokenizer, s, model.registry)


def collate(model, examples, packing, side="right", with_user=True):
    tok = model.tokenizer
    return PreferenceCollator(tok.pad_token_id, tok.bos_token_id, model.n_implicit_tokens, side, packing, with_user)(examples)


def test_packed_attention_mask_and_positions():
    # [shared x3] [chosen x2] [rejected x2] [pad]
    branch = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1]])
    allowed, pos = packed_attention(branch)
    assert pos[0, :7].tolist() == [0, 1, 2, 3, 4, 3, 4]  # rejected restarts where the prompt ends
    assert allowed[0, 5, :5].tolist() == [True, True, True, False, False]  # rejected does not see chosen
    assert allowed[0, 6].tolist() == [True, True, True, False, False, True, True, False]
    assert not allowed[0, :7, 7].any()  # nobody sees padding
    hidden = torch.tensor([[False, True, False, False, False, False, False, False]])  # a user position
    allowed, pos = packed_attention(branch, hidden)
    assert pos[0, [0, 2, 3, 4, 5, 6]].tolist() == [0, 1, 2, 3, 2, 3] and not allowed[0, 2:7, 1].any()


@pytest.mark.parametrize("kind", ["individual", "cluster", "none"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_and_response_only_logps_equal_plain_reference(kind, side):
    model = build_model(user_model=kind, n_tokens=3, users=("a", "b", "c"))
    ex = examples_for(model)
    plain = collate(model, ex, packing=False)
    rows = plain["user_rows"]
    expected = plain_logps(model, plain, rows.repeat(2))  # full logits, 2D mask, one row per response
    for packing in (False, True):
        batch = collate(model, ex, packing, side)
        for full in (False, True):
            got = model.term_logps(batch, [(rows, None)], full_logits=full)[0]
            assert rel(got, expected) <= 1e-4, (packing, full)
        ref = reference_pair_logps(model, batch, model.llm)
        assert rel(ref, plain_reference_logps(model, plain, model.llm)) <= 1e-4
    packed = collate(model, ex, packing=True)
    assert packed["input_ids"].shape[0] == len(ex) and plain["input_ids"].shape[0] == 2 * len(ex)
    assert packed["attention_mask"].sum() < plain["attention_mask"].sum()  # the prompt is there once, not twice


def test_several_terms_in_one_forward_equal_separate_computations():
    model = build_model(user_model="individual", n_tokens=2)
    ex = examples_for(model)
    batch, plain = collate(model, ex, True), collate(model, ex, False)
    users = batch["user_rows"]
    generic = torch.zeros_like(users)
    selected = users != 0
    calls = []
    hook = model.llm.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    both = model.term_logps(batch, [(users, None), (generic, selected)])
    hook.remove()
    assert len(calls) == 1  # one forward pass for both terms
    assert rel(both[0], plain_logps(model, plain, users.repeat(2))) <= 1e-4
    expected_generic = plain_logps(model, plain, generic.repeat(2))
    sel = selected.repeat(2)
    assert rel(both[1][sel], expected_generic[sel]) <= 1e-4
    assert (both[1][~sel] == 0).all()  # pairs a term does not select are not run


def test_lm_head_runs_at_response_positions_only():
    model = build_model(user_model="individual", n_tokens=2)
    ex = examples_for(model)
    batch = collate(model, ex, True)
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    model.term_logps(batch, [(batch["user_rows"], None)])
    hook.remove()
    n_response = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in ex)
    assert seen == [torch.Size([n_response, model.llm.config.hidden_size])]


def test_eager_attention_takes_the_packed_mask():
    llm, tok = tiny_llama()
    llm.config._attn_implementation = "eager"
    model = PersonalizedLM.build(PersonalizationConfig("tiny-llama", n_user_tokens=2), UserRegistry(["a", "b", "c"]), llm=llm,
                                 tokenizer=tok)
    ex = examples_for(model)
    plain, packed = collate(model, ex, False), collate(model, ex, True)
    rows = plain["user_rows"]
    assert rel(model.term_logps(packed, [(rows, None)])[0], plain_logps(model, plain, rows.repeat(2))) <= 1e-4


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True, n_user_tokens=2,
                per_device_train_batch_size=4, save_strategy="no", reference_cache_dir=str(tmp_path / "cache"),
                learning_rate=1e-3, beta=0.3, sft_weight=0.2,
                health_eval_pairs=0)  # every pair trains: these tests count reference passes over the training pairs
    base.update(kw)
    return PDPOConfig(**base)


def _moved_model(seed=0):
    model = build_model(user_model="individual", n_tokens=2, users=("a", "b", "c"))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # a policy away from the reference, so that losses and gradients are not trivial
        for p in model.llm.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("alpha", [0.5, 1.0, 0.0])
def test_fast_and_official_paths_give_same_loss_and_gradients(tmp_path, alpha):
    reference = tiny_llama()[0]
    results = {}
    for name, kw in (("fast", {}), ("official", dict(packing=False, precompute_ref_log_probs=False, response_logits_only=False))):
        model = _moved_model()
        trainer = PDPOTrainer(model=model, args=_args(tmp_path / name, alpha=alpha, **kw), train_dataset=RECS,
                              reference_model=copy.deepcopy(reference))
        batch = trainer.data_collator(trainer.train_dataset)
        model.zero_grad()
        loss, _ = trainer.pdpo_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.detach(), grads)
    (l1, g1), (l2, g2) = results["fast"], results["official"]
    assert abs(l1 - l2) / abs(l2) <= 1e-4
    assert g1.keys() == g2.keys() and len(g1) > 0
    for n in g1:
        assert rel(g1[n], g2[n]) <= 1e-4, n


def test_loss_equals_hand_computation_with_generic_user_pairs(tmp_path):
    """Pairs of the generic user are run once; the loss still equals the P-DPO formula term by term."""
    model = _moved_model()
    reference = tiny_llama()[0]
    trainer = PDPOTrainer(model=model, args=_args(tmp_path, alpha=0.3), train_dataset=RECS, reference_model=reference)
    batch = trainer.data_collator(trainer.train_dataset)
    loss, _ = trainer.pdpo_loss(model, batch)
    plain = collate(model, trainer.train_dataset, packing=False)
    users = plain["user_rows"]
    B = len(users)
    ref = plain_reference_logps(model, plain, reference)
    per_term = []
    for rows in (users, torch.zeros_like(users)):
        lp = plain_logps(model, plain, rows.repeat(2))
        losses, _, _ = preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], 0.3)
        n_chosen = (plain["labels"][:B, 1:] != -100).sum(-1)
        per_term.append(losses + 0.2 * (-lp[:B] / n_chosen))
    expected = personalized_loss(per_term[0], per_term[1], 0.3).mean()
    assert abs(loss.item() - expected.item()) <= 1e-4 * abs(expected.item())


def test_reference_is_precomputed_once_and_cached_on_disk(tmp_path):
    calls = []
    model = build_model(user_model="individual", n_tokens=2, users=("long_fan", "short_fan"), randomize=False)
    records = two_user_records(n_prompts=6)
    args = _args(tmp_path, max_steps=2, train_sampling_strategy="sequential")
    hook = model.llm.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    trainer = PDPOTrainer(model=model, args=args, train_dataset=records)
    n_precompute = len(calls)
    # one decoder call per batch of the reference pass, plus the start-up check of the fast paths
    # (plain layout, packed, response-only head: three calls on the first pairs)
    assert n_precompute == -(-len(records) // args.per_device_eval_batch_size) + 3
    assert trainer.reference_model is None  # no copy of the weights is kept
    expected = plain_reference_logps(model, collate(model, trainer.train_dataset, False), model.llm)
    got = torch.tensor([e["ref_logps"] for e in trainer.train_dataset]).T.reshape(-1)
    assert rel(got, expected) <= 1e-4
    before = len(calls)
    trainer.train()
    assert len(calls) == before + 2  # one forward per training step, no reference pass
    hook.remove()
    files = list(Path(args.reference_cache_dir).glob("*"))
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # nothing half-written left behind

    # same model, tokenizer, data and truncation: read from disk, same numbers
    again = PDPOTrainer(model=build_model(user_model="individual", n_tokens=2, users=("long_fan", "short_fan"), randomize=False),
                        args=_args(tmp_path, max_steps=2, alpha=1.0), train_dataset=records)
    assert again.reference_cache_hits == 1 and again.reference_seconds == 0.0
    assert [e["ref_logps"] for e in again.train_dataset] == [e["ref_logps"] for e in trainer.train_dataset]
    # other truncation, other weights: computed afresh
    cut = PDPOTrainer(model=build_model(user_model="individual", n_tokens=2, users=("long_fan", "short_fan"), randomize=False),
                      args=_args(tmp_path, max_steps=2, max_length=30), train_dataset=records)
    assert cut.reference_cache_hits == 0 and cut.reference_seconds > 0
    other = build_model(user_model="individual", n_tokens=2, users=("long_fan", "short_fan"), randomize=False)
    other.llm = tiny_llama(seed=1)[0]
    assert PDPOTrainer(model=other, args=_args(tmp_path, max_steps=2), train_dataset=records).reference_cache_hits == 0
    assert len(list(Path(args.reference_cache_dir).glob("*"))) == 3


def test_no_reference_and_no_precomputed_logps_is_a_clear_error(tmp_path):
    model = build_model(user_model="individual", n_tokens=2, users=("a", "b", "c"))
    trainer = PDPOTrainer(model=model, args=_args(tmp_path, reference_cache_dir="none"), train_dataset=RECS)
    fresh = examples_for(model)  # not seen by the trainer: no ref_logps
    with pytest.raises(ValueError, match="no precomputed reference log-probs"):
        trainer.pdpo_loss(model, trainer.data_collator(fresh))


def test_attention_without_4d_masks_is_refused_up_front_unless_unpacked(tmp_path):
    model = build_model(user_model="individual", n_tokens=2, users=("a", "b", "c"))
    model.llm.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="packing=False"):
        PDPOTrainer(model=model, args=_args(tmp_path), train_dataset=RECS)


def test_gradient_checkpointing_gives_the_same_gradients_on_packed_rows(tmp_path):
    grads = {}
    for ckpt in (False, True):
        model = _moved_model()
        trainer = PDPOTrainer(model=model, args=_args(tmp_path / str(ckpt)), train_dataset=RECS,
                              reference_model=tiny_llama()[0])
        if ckpt:
            model.activation_checkpointing_enable()  # what Trainer.train() calls for gradient_checkpointing=True
            assert model.is_gradient_checkpointing
        model.train()
        batch = trainer.data_collator(trainer.train_dataset)
        loss, _ = trainer.pdpo_loss(model, batch)
        loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for n in grads[False]:
        assert rel(grads[True][n], grads[False][n]) <= 1e-4, n


@pytest.mark.parametrize("lora", [False, True])
def test_training_with_gradient_checkpointing_takes_the_same_steps(tmp_path, lora):
    """Trainer's gradient_checkpointing=True (recomputed activations, LoRA's input grads) trains
    the same model as without: the same losses at every step and the same weights after them."""
    import copy

    base = build_model(user_model="individual", n_tokens=2, users=("a", "b", "c"))
    kw = dict(use_lora=True, lora_r=4) if lora else {}
    if lora:
        from peft import LoraConfig, get_peft_model

        base.llm = get_peft_model(base.llm, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
        base.prlhf_config.use_lora = True
    runs = {}
    for ckpt in (False, True):
        model = copy.deepcopy(base)
        trainer = PDPOTrainer(model=model, args=_args(tmp_path / str(ckpt), max_steps=3, logging_steps=1,
                                                      gradient_checkpointing=ckpt, train_sampling_strategy="sequential",
                                                      **kw), train_dataset=RECS)
        trainer.train()
        assert model.is_gradient_checkpointing == ckpt
        runs[ckpt] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                      {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(runs[True][0]) == 3 and runs[True][0] == pytest.approx(runs[False][0], abs=1e-5)
    for n, p in runs[False][1].items():
        assert rel(runs[True][1][n], p) <= 1e-4, n


def test_lazy_reference_trains_as_the_precomputed_one_and_scores_only_visited_pairs(tmp_path):
    """LoRA: the reference is the base with adapters disabled, always at hand; lazy_reference
    computes a pair's reference log-probs at its first visit, so a short run scores only its pairs."""
    records = two_user_records(n_prompts=16)  # 32 pairs
    runs = {}
    for lazy in (False, True):
        llm, tok = tiny_llama()
        args = PDPOConfig(output_dir=str(tmp_path / str(lazy)), report_to="none", use_cpu=True, disable_tqdm=True,
                          use_lora=True, lora_r=4, learning_rate=1e-3, per_device_train_batch_size=4, max_steps=3,
                          save_strategy="no", train_sampling_strategy="sequential", lazy_reference=lazy,
                          reference_cache_dir="none", n_user_tokens=2, health_eval_pairs=0)  # training pairs only
        cfg = PersonalizationConfig("tiny-llama", user_model="individual", n_user_tokens=2, use_lora=True)
        torch.manual_seed(0)  # the same LoRA initialisation in both runs
        model = PersonalizedLM.build(cfg, UserRegistry.from_records(records), llm=llm, tokenizer=tok,
                                     lora_kwargs=args.lora_kwargs())
        trainer = PDPOTrainer(model=model, args=args, train_dataset=records)
        if lazy:
            assert "ref_logps" not in trainer.train_dataset[0] and trainer.reference_seconds == 0
        trainer.train()
        runs[lazy] = trainer
    assert len(runs[True]._lazy_reference) == 12  # 3 steps of 4 pairs: the visited pairs only
    assert runs[True].reference_seconds > 0
    # the same reference numbers up to float summation order (the precomputed pass has no user tokens in
    # its rows, the lazy one hides them), which Adam's first steps amplify to ~1e-5 at most
    worst = max((p - q).abs().max().item() for (_, p), (_, q) in zip(runs[False].model.named_parameters(),
                                                                   runs[True].model.named_parameters()))
    assert worst < 1e-4
    first = runs[False].train_dataset[0]["ref_logps"]
    assert runs[True]._lazy_reference[("train", 0)] == pytest.approx(first, abs=1e-5)
