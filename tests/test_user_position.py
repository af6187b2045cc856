"""``user_position: before_response``: the user tokens between the prompt and the response. One
packed row then holds the prompt once and both P-DPO terms' user tokens and responses behind it
(a tree mask); every layout must give the plain computation's log-probs, gradients, reference
log-probs and loss, and generation must continue the prompt after the user tokens."""

import pytest
import torch
from conftest import RECS, rel, sequence_logps, two_user_records

from prlhf.base_models import tiny_llama
from prlhf.config import PDPOConfig, PersonalizationConfig
from prlhf.data import load_preference_data, tokenize_dataset
from prlhf.layout import build_sequence
from prlhf.modeling import PersonalizedLM
from prlhf.reference import reference_pair_logps
from prlhf.scoring import packed_attention
from prlhf.trainers.pdpo import PDPOTrainer
from prlhf.users import GENERIC_ROW, UserRegistry


def model_for(user_model="individual", position="before_response", **cfg):
    llm, tok = tiny_llama()
    config = PersonalizationConfig("tiny-llama", user_model=user_model, n_user_tokens=3, user_position=position,
                                   user_offset_init="vocab", **cfg)
    return PersonalizedLM.build(config, UserRegistry(["a", "b", "c"]), llm=llm, tokenizer=tok)


def examples(model, records=RECS):
    return tokenize_dataset(load_preference_data(records), model.tokenizer, model.tokenize_settings(None, None),
                            model.registry)


def test_build_sequence_places_user_tokens_after_bos_or_before_the_response():
    ids, labels, implicit, user = build_sequence([1, 10, 11], [20, 21], [30], 2, 1, 0, "before_response")
    assert ids == [1, 10, 11, 0, 0, 30, 20, 21] and labels == [-100] * 6 + [20, 21]
    assert implicit == [False] * 3 + [True, True] + [False] * 3 and user == [False] * 3 + [True] * 3 + [False] * 2
    assert build_sequence([1, 10, 11], [20], [30], 2, 1, 0)[0] == [1, 0, 0, 30, 10, 11, 20]  # the paper's prefix


def test_tree_mask_two_terms_share_the_prompt():
    # [prompt x2] [u1 x1] [c1 x1] [r1 x1] [u0 x1] [c0 x1] [r0 x1]
    branch = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    parent = torch.tensor([[0, 0, 0, 1, 1, 0, 4, 4]])
    allowed, pos = packed_attention(branch, None, parent)
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 2, 3, 3]  # every term restarts after the prompt
    assert allowed[0, 6].tolist() == [True, True, False, False, False, True, True, False]  # c0 sees prompt, u0, itself
    assert allowed[0, 4].tolist() == [True, True, True, False, True, False, False, False]  # r1 does not see c1


@pytest.mark.parametrize("user_model", ["individual", "cluster"])
def test_packed_two_terms_equal_plain_log_probs_and_gradients(user_model):
    model = model_for(user_model)
    exs = examples(model)
    B = len(exs)
    generic = torch.full((B,), GENERIC_ROW)

    def plain(rows):
        batch = model.collator(packing=False)(exs)
        logits = model(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], torch.cat([rows, rows]))
        return sequence_logps(logits, batch["labels"])

    packed_batch = model.collator(packing=True, n_terms=2)(exs)
    rows = packed_batch["user_rows"]
    model.zero_grad()
    got = model.term_logps(packed_batch, [(rows, None), (generic, rows != GENERIC_ROW)])
    (got * torch.linspace(0.5, 1.5, got.numel()).view_as(got)).sum().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = torch.stack([plain(rows), plain(generic) * (rows != GENERIC_ROW).repeat(2)])
    (want * torch.linspace(0.5, 1.5, want.numel()).view_as(want)).sum().backward()
    assert rel(got.detach(), want.detach()) < 1e-4
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert rel(g_packed[n], p.grad) < 1e-4, n
    # one term per row (alpha 1, alpha_sampling) packs the same way
    one = model.term_logps(model.collator(packing=True)(exs), [(rows, None)])[0]
    assert rel(one.detach(), want[0].detach()) < 1e-4


def test_reference_log_probs_do_not_depend_on_the_layout():
    model = model_for()
    exs = examples(model)
    expected = reference_pair_logps(model, model.collator(with_user=False)(exs), policy_is_reference=True)
    for packing, n_terms in ((False, 1), (True, 1), (True, 2)):
        got = reference_pair_logps(model, model.collator(packing=packing, n_terms=n_terms)(exs), policy_is_reference=True)
        assert rel(got, expected) < 1e-4, (packing, n_terms)
    prefix = model_for(position="prefix")
    got = reference_pair_logps(prefix, prefix.collator(packing=True)(examples(prefix)), policy_is_reference=True)
    assert rel(got, expected) < 1e-4


def test_trainer_loss_is_the_plain_loss_and_learns_opposite_users(tmp_path):
    records = two_user_records(n_prompts=4)
    losses = {}
    for packing in (True, False):
        args = PDPOConfig(output_dir=str(tmp_path / str(packing)), report_to="none", use_cpu=True, disable_tqdm=True,
                          user_model="individual", n_user_tokens=3, user_position="before_response", packing=packing,
                          alpha=0.3, sft_weight=0.2, user_offset_init="vocab", per_device_train_batch_size=8)
        trainer = PDPOTrainer(args=args, train_dataset=records)
        batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset))
        assert ("n_terms" in batch) == packing
        with torch.no_grad():
            losses[packing] = trainer.pdpo_loss(trainer.model, batch)[0].item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)

    from prlhf.evaluation import evaluate_accuracy

    records = two_user_records(n_prompts=24)
    args = PDPOConfig(output_dir=str(tmp_path / "learn"), report_to="none", use_cpu=True, disable_tqdm=True,
                      # 5 epochs: on this toy task the layout learns more slowly than the prefix (3 epochs: 0.75 per user)
                      num_train_epochs=5, per_device_train_batch_size=8, user_model="individual", n_user_tokens=4,
                      user_learning_rate=1e-2, learning_rate=1e-3, user_position="before_response", logging_steps=100,
                      save_strategy="no")
    trainer = PDPOTrainer(args=args, train_dataset=records)
    trainer.train()
    trainer.save_model()
    loaded = PersonalizedLM.from_pretrained(tmp_path / "learn")
    assert loaded.prlhf_config.user_position == "before_response"
    acc = evaluate_accuracy(loaded, records, tiny_llama()[0])["accuracy"]["per_user"]
    assert acc["long_fan"] >= 0.9 and acc["short_fan"] >= 0.9


def test_generation_continues_after_the_user_tokens():
    model = model_for()
    model.eval()
    batch = model.prepare_prompts(["Q: the dog\nA:"], ["b"])
    prompt_ids = model.tokenizer("Q: the dog\nA:")["input_ids"]
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ids[:len(prompt_ids)] == prompt_ids  # the prompt first, the user's slots after it
    assert batch["implicit_mask"][0][batch["attention_mask"][0].bool()].tolist()[len(prompt_ids):] == [True] * 3
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], batch["user_rows"])
    first = model.generate_ids(batch, max_new_tokens=1, do_sample=False)[0, 0].item()
    assert first == logits[0, -1].argmax().item()


def test_shared_prompt_cache_gives_the_plain_generations():
    """A prompt asked for several users runs once; its KV cache is shared by the users' rows, whose
    user parts (slots + user text of different lengths) are padded on their own: the same tokens
    as one plain left-padded generate() per batch."""
    model = model_for(max_user_text_tokens=8)
    model.eval()
    prompts = ["Q: the dog\nA:", "Q: a much longer question about the cat\nA:", "Q: the dog\nA:", "Q: the dog\nA:", "Q: x\nA:"]
    users = ["a", "b", None, "c", "a"]
    texts = [None, "likes brevity", "a generic reader with long text here", None, "x"]
    # automatic (None): shared when a prompt repeats, plain rows when every prompt is distinct
    assert "prompt_rows" in model.prepare_prompts(prompts, users, texts, share_prompts=None)
    assert "prompt_rows" not in model.prepare_prompts(prompts[1:2] + prompts[4:], users[1:2] + users[4:], share_prompts=None)
    shared = model.prepare_prompts(prompts, users, texts, share_prompts=True)
    assert shared["prompt_rows"].tolist() == [0, 1, 0, 0, 2]
    kw = dict(max_new_tokens=6, do_sample=False)
    plain = model.generate_ids(model.prepare_prompts(prompts, users, texts), **kw)
    assert torch.equal(model.generate_ids(shared, **kw), plain)
    assert model.generate(prompts, users, texts, **kw) == model.generate(prompts, users, texts, share_prompt_cache=False, **kw)
    with torch.no_grad():  # the first step's logits, to the float tolerance of a differently padded batch
        embeds = model.embed(shared["input_ids"], shared["implicit_mask"], shared["user_rows"])
        cache = model.prefill_prompts(shared, embeds)
        w = shared["prompt_width"]
        from prlhf.scoring import cache_kwarg, position_ids_from_mask
        out = model.llm(inputs_embeds=embeds[:, w:], attention_mask=shared["attention_mask"],
                        position_ids=position_ids_from_mask(shared["attention_mask"])[:, w:], **{cache_kwarg(model.llm): cache})
        batch = model.prepare_prompts(prompts, users, texts)
        ref = model(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], batch["user_rows"])
    assert torch.allclose(out.logits[:, -1], ref[:, -1], atol=1e-5)
    with pytest.raises(ValueError, match="before_response"):
        model_for(position="prefix").generate(prompts[:2], users[:2], share_prompt_cache=True)
