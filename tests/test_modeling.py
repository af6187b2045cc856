"""Injection of the user embedding as a soft prompt: invariants against the plain base model."""

import pytest
import torch
from conftest import build_model, collate, plain_logps, plain_reference_logps, sequence_logps

from prlhf.base_models import tiny_llama
from prlhf.modeling import PersonalizedLM

RECS = [
    {"user_id": "a", "prompt": "Tell me about dogs.", "chosen": " Dogs are loyal friends and good pets.", "rejected": " Dogs."},
    {"user_id": "b", "prompt": "What is money?", "chosen": " Money.", "rejected": " Money is a medium of exchange used to buy things."},
    {"user_id": "c", "prompt": "Hi", "chosen": " Hello there, how are you today?", "rejected": " Go away."},
]


def base_logps(llm, batch_examples):
    """Reference computation: each prompt+response alone, no padding, no user input."""
    out = []
    for prompt_ids, response_ids in batch_examples:
        ids = torch.tensor([prompt_ids + response_ids])
        labels = ids.clone()
        labels[:, : len(prompt_ids)] = -100
        out.append(sequence_logps(llm(input_ids=ids).logits, labels).item())
    return out


def pairs_of(model, records):
    tok = model.tokenizer
    from prlhf.data import tokenize_response

    chosen = [tokenize_response(tok, r["prompt"], r["chosen"]) for r in records]
    rejected = [tokenize_response(tok, r["prompt"], r["rejected"]) for r in records]
    return chosen + rejected


def test_zero_user_tokens_gives_base_logits():
    model = build_model(user_model="none")
    batch = collate(model, RECS)
    logits = model(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], batch["user_rows"].repeat(2))
    base = model.llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(logits[real], base[real], atol=1e-5)
    assert plain_logps(model, batch, batch["user_rows"].repeat(2)).tolist() == pytest.approx(
        base_logps(model.llm, pairs_of(model, RECS)), abs=1e-4)


@pytest.mark.parametrize("kind", ["individual", "cluster", "uniform"])
def test_left_and_right_padding_give_same_logps(kind):
    model = build_model(user_model=kind, n_tokens=3)
    recs = [dict(r, user_text="I like short answers" if i == 0 else None) for i, r in enumerate(RECS)]
    right, left = collate(model, recs, "right"), collate(model, recs, "left")
    assert not torch.equal(right["input_ids"], left["input_ids"])  # padding really differs
    rows = right["user_rows"].repeat(2)
    lp_r, lp_l = plain_logps(model, right, rows), plain_logps(model, left, rows)
    assert torch.allclose(lp_r, lp_l, atol=1e-4)
    assert torch.allclose(plain_reference_logps(model, right, model.llm), plain_reference_logps(model, left, model.llm), atol=1e-4)


def test_reference_masks_out_all_user_input():
    """pi_SFT(y|x) computed on the personalized layout equals the plain sequence without user input."""
    model = build_model(user_model="individual", n_tokens=4)
    recs = [dict(r, user_text="expert reader, likes detail") for r in RECS]
    batch = collate(model, recs)
    assert batch["user_mask"].sum(1).min() > 4  # implicit slots plus text tokens
    ref = plain_reference_logps(model, batch, model.llm)
    assert ref.tolist() == pytest.approx(base_logps(model.llm, pairs_of(model, recs)), abs=1e-4)


def test_different_users_get_different_logps_and_unknown_ids_are_generic():
    model = build_model(user_model="individual", n_tokens=3)
    batch = collate(model, [RECS[0]] * 1)
    rows = lambda r: torch.tensor([r, r])  # noqa: E731
    lp = {u: plain_logps(model, batch, rows(model.registry.row(u))) for u in ["a", "b", None, "stranger"]}
    assert not torch.allclose(lp["a"], lp["b"], atol=1e-3)
    assert not torch.allclose(lp["a"], lp[None], atol=1e-3)
    assert torch.equal(lp["stranger"], lp[None])  # unknown id -> generic row 0
    assert model.registry.row("stranger") == 0 and model.registry.row(None) == 0 and model.registry.row("a") == 1


def test_uniform_user_model_ignores_user():
    model = build_model(user_model="uniform", n_tokens=3)
    batch = collate(model, [RECS[0]])
    assert torch.equal(plain_logps(model, batch, torch.tensor([1, 1])), plain_logps(model, batch, torch.tensor([0, 0])))


def test_explicit_user_text_changes_logps():
    model = build_model(user_model="none")
    plain = collate(model, [RECS[0]])
    with_text = collate(model, [dict(RECS[0], user_text="I am a veterinarian")])
    rows = torch.tensor([0, 0])
    assert not torch.allclose(plain_logps(model, plain, rows), plain_logps(model, with_text, rows), atol=1e-3)
    assert torch.allclose(plain_reference_logps(model, plain, model.llm), plain_reference_logps(model, with_text, model.llm), atol=1e-4)


def test_soft_prompt_goes_after_bos():
    model = build_model(user_model="individual", n_tokens=2)
    batch = collate(model, [RECS[0]])
    bos = model.tokenizer.bos_token_id
    assert batch["input_ids"][0, 0].item() == bos
    assert batch["implicit_mask"][0].tolist()[:4] == [False, True, True, False]


def test_generate_with_cache_equals_no_cache_for_mixed_users():
    """One generate() call with the KV cache == a plain greedy loop re-running the full sequence."""
    model = build_model(user_model="individual", n_tokens=3)
    prompts = ["Tell me about dogs.", "hi", "What is money?", "Tell me about dogs."]
    users = ["a", None, "b", "c"]
    batch = model.prepare_prompts(prompts, users)
    new = model.generate_ids(batch, max_new_tokens=6, do_sample=False, eos_token_id=None)
    # reference: no cache, full recomputation each step, explicit positions
    embeds = model.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])
    mask = batch["attention_mask"]
    steps = []
    with torch.no_grad():
        for _ in range(6):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1)
            steps.append(nxt)
            embeds = torch.cat([embeds, model.llm.get_input_embeddings()(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(new, torch.stack(steps, 1))
    # the same prompt for users a and c: next-token logits differ
    with torch.no_grad():
        b2 = model.prepare_prompts([prompts[0], prompts[0]], ["a", "c"])
        l2 = model(b2["input_ids"], b2["attention_mask"], b2["implicit_mask"], b2["user_rows"])
    assert not torch.allclose(l2[0, -1], l2[1, -1], atol=1e-3)


def test_save_load_round_trip(tmp_path):
    model = build_model(user_model="cluster", n_tokens=3, n_clusters=2)
    model.registry.user_texts["a"] = "likes cats"
    model.save_pretrained(tmp_path / "m")
    loaded = PersonalizedLM.from_pretrained(tmp_path / "m")
    batch = collate(model, RECS)
    rows = batch["user_rows"].repeat(2)
    model.eval()
    assert torch.equal(plain_logps(model, batch, rows), plain_logps(loaded, batch, rows))
    assert loaded.registry.ids == ["a", "b", "c"] and loaded.registry.user_texts == {"a": "likes cats"}
    kw = dict(max_new_tokens=5, do_sample=False)
    assert model.generate(["hi", "dogs"], ["a", None], **kw) == loaded.generate(["hi", "dogs"], ["a", None], **kw)
    assert not list((tmp_path / "m").glob(".tmp-save-*"))  # nothing half-written left behind


def test_lora_save_load_round_trip(tmp_path):
    model = build_model(user_model="individual", n_tokens=2, use_lora=True)
    model.llm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.data.normal_()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "m" / "model.safetensors").exists()  # only the adapter, not a copy of the base
    loaded = PersonalizedLM.from_pretrained(tmp_path / "m")
    batch = collate(model, RECS)
    rows = batch["user_rows"].repeat(2)
    model.eval()
    assert torch.allclose(plain_logps(model, batch, rows), plain_logps(loaded, batch, rows), atol=1e-6)
    # the reference is the base with adapters disabled: it ignores the adapter
    ref = plain_reference_logps(loaded, batch)
    assert torch.allclose(ref, plain_reference_logps(model, batch), atol=1e-6)
    base, _ = tiny_llama()
    assert torch.allclose(ref, plain_reference_logps(model, batch, base), atol=1e-5)
    assert not torch.allclose(ref, plain_reference_logps(model, batch, model.llm), atol=1e-3)


@pytest.mark.parametrize("offset_init", ["zero", "vocab", "random"])
def test_offset_init_decides_whether_users_start_apart(offset_init):
    """zero offsets: every user starts as the generic user e_0; vocab / random: each user starts at
    its own embedding, at the token embeddings' scale."""
    model = build_model("individual", users=("a", "b"), randomize=False, user_offset_init=offset_init)
    rows = torch.tensor([0, 1, 2])
    e = model.user_model(rows)  # (3, T_u, d)
    if offset_init == "zero":
        assert torch.equal(e[1], e[0]) and torch.equal(e[2], e[0])
    else:
        assert not torch.allclose(e[1], e[0]) and not torch.allclose(e[1], e[2])
        table = model.llm.get_input_embeddings().weight
        ratio = float(model.user_model.offsets.std() / table.std())
        assert 0.5 < ratio < 2.0


def test_injection_by_hand_equals_production():
    """Independent oracle: e_u = e_0 + o_u assembled by hand from the parameters and placed after
    BOS in a plain ``inputs_embeds`` call (no ``embed()``, no collator masks, no packing); the
    production path scores the same response tokens to 1e-5, for each user and the generic user."""
    import torch.nn.functional as F

    from prlhf.data import tokenize_response

    model = build_model(user_model="individual", n_tokens=3)
    um, tok, T_u = model.user_model, model.tokenizer, 3
    table = model.llm.get_input_embeddings()  # the module: some families (Gemma) scale in it
    records = RECS + [dict(RECS[0], user_id=None)]  # the generic user: e_0 alone
    batch = collate(model, records)
    with torch.no_grad():
        got = model.term_logps(batch, [(batch["user_rows"], None)])[0]  # (2B,)
        B = len(records)
        for i, rec in enumerate(records):
            row = model.registry.row(rec["user_id"])
            e_u = um.generic + (um.offsets[row - 1] if row > 0 else 0)  # (T_u, d)
            for column, response in ((i, rec["chosen"]), (B + i, rec["rejected"])):
                prompt_ids, response_ids = tokenize_response(tok, rec["prompt"], response)
                assert prompt_ids[0] == tok.bos_token_id
                ids = torch.tensor(prompt_ids + response_ids)
                embeds = torch.cat([table(ids[:1]), e_u, table(ids[1:])]).unsqueeze(0)
                logits = model.llm(inputs_embeds=embeds).logits[0]  # positions 0..L+T_u-1, no mask
                start = len(prompt_ids) + T_u  # first response token
                logp = F.log_softmax(logits[start - 1:-1].float(), -1)
                expected = logp.gather(1, torch.tensor(response_ids).unsqueeze(1)).sum()
                assert got[column].item() == pytest.approx(expected.item(), abs=1e-4)
