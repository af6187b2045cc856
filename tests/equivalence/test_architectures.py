"""Model families beyond Llama: tiny random GPT-2, Qwen2, Gemma-2, Mistral (sliding window) and Phi-3.

For each: packed and response-only log-probs equal an independent plain computation (the user
embedding assembled by hand, each sequence alone, full logits); save / load keeps them; cached
generation equals a full recomputation. Where the fast paths cannot be equal (a sliding window
shorter than the sequences), training refuses them with a message naming the setting."""

import pytest
import torch
import torch.nn.functional as F
from conftest import two_user_records

from prlhf.base_models import tiny_family, tiny_tokenizer
from prlhf.collate import PreferenceCollator
from prlhf.config import PersonalizationConfig
from prlhf.data import load_preference_data, tokenize_dataset, tokenize_response
from prlhf.modeling import PersonalizedLM
from prlhf.scoring import verify_fast_paths
from prlhf.users import UserRegistry

RECS = [
    {"user_id": "a", "prompt": "Tell me about dogs.", "chosen": " Dogs are loyal friends and good pets.", "rejected": " Dogs."},
    {"user_id": "b", "prompt": "What is money?", "chosen": " Money.", "rejected": " Money is a medium of exchange."},
    {"user_id": None, "prompt": "Hi", "chosen": " Hello there, how are you today?", "rejected": " Go away."},
]


def build(name, **over):
    tok = tiny_tokenizer()
    llm = tiny_family(name, tok, **over)
    config = PersonalizationConfig(base_model_name_or_path=name, user_model="individual", n_user_tokens=3,
                                   user_offset_init="random")
    return PersonalizedLM.build(config, UserRegistry(["a", "b"]), llm=llm, tokenizer=tok).eval()


def batch_for(model, packing):
    settings = model.tokenize_settings(None, None)
    ex = tokenize_dataset(load_preference_data(RECS), model.tokenizer, settings, model.registry)
    tok = model.tokenizer
    return PreferenceCollator(tok.pad_token_id, tok.bos_token_id, model.n_implicit_tokens, "right", packing=packing)(ex)


def oracle(model):
    """(2B,) log-probs: e_u = e_0 + o_u by hand, each sequence alone, no mask, full logits."""
    um, tok, T_u = model.user_model, model.tokenizer, model.n_implicit_tokens
    table = model.llm.get_input_embeddings()  # the module: some families (Gemma) scale in it
    chosen, rejected = [], []
    for rec in RECS:
        row = model.registry.row(rec["user_id"])
        e_u = um.generic + (um.offsets[row - 1] if row > 0 else 0)
        for out, response in ((chosen, rec["chosen"]), (rejected, rec["rejected"])):
            prompt_ids, response_ids = tokenize_response(tok, rec["prompt"], response)
            ids = torch.tensor(prompt_ids + response_ids)
            embeds = torch.cat([table(ids[:1]), e_u, table(ids[1:])]).unsqueeze(0)
            logits = model.llm(inputs_embeds=embeds).logits[0].float()
            start = len(prompt_ids) + T_u
            logp = F.log_softmax(logits[start - 1:-1], -1)
            out.append(logp.gather(1, torch.tensor(response_ids).unsqueeze(1)).sum())
    return torch.stack(chosen + rejected)


FAMILIES = ["gpt2", "qwen2", "gemma2", "mistral", "phi3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_and_fast_head_log_probs_equal_the_plain_computation(name):
    """The plain layout is exact for every family; packing and the response-only head are either
    exact too, or the start-up check refuses them, naming the setting."""
    model = build(name)
    problem = verify_fast_paths(model, RECS)
    with torch.no_grad():
        expected = oracle(model)
        for packing in (True, False):
            batch = batch_for(model, packing)
            rows = batch["user_rows"]
            for full_logits in (False, True):
                got = model.term_logps(batch, [(rows, None)], full_logits=full_logits)[0]
                exact = torch.allclose(got, expected, atol=1e-4)
                if packing and not exact:
                    assert problem is not None and problem.startswith("packing=True"), (name, problem)
                else:
                    assert exact, (name, packing, full_logits, got, expected)
    assert problem is None  # every family here is exact, and the start-up check agrees


@pytest.mark.parametrize("name", FAMILIES)
def test_save_load_and_cached_generation(name, tmp_path):
    model = build(name)
    batch = batch_for(model, True)
    model.save_pretrained(tmp_path / "m")
    # the loader rebuilds the family from the saved base: here the tiny model is not on the hub,
    # so the saved folder holds the full weights (no LoRA) and loads from itself
    loaded = PersonalizedLM.from_pretrained(tmp_path / "m")
    assert type(loaded.llm) is type(model.llm)
    with torch.no_grad():
        a = model.term_logps(batch, [(batch["user_rows"], None)])
        b = loaded.term_logps(batch, [(batch["user_rows"], None)])
    assert torch.allclose(a, b, atol=1e-6)
    prompts, users = ["Tell me about dogs.", "hi", "What is money?"], ["a", None, "b"]
    p = loaded.prepare_prompts(prompts, users)
    new = loaded.generate_ids(p, max_new_tokens=5, do_sample=False, eos_token_id=None)
    embeds = loaded.embed(p["input_ids"], p["implicit_mask"], p["user_rows"])
    mask, steps = p["attention_mask"], []
    with torch.no_grad():
        for _ in range(5):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = loaded.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            steps.append(nxt)
            embeds = torch.cat([embeds, loaded.llm.get_input_embeddings()(nxt)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(new, torch.stack(steps, 1))


def test_sliding_window_shorter_than_the_sequences_refuses_packing(tmp_path):
    """A ready 4D mask bypasses the sliding window: packed log-probs would differ, so training
    with packing is refused, naming the setting; the plain layout is exact."""
    model = build("mistral", sliding_window=4)
    msg = verify_fast_paths(model, RECS)
    assert msg is not None and "packing" in msg and "sliding_window" in msg
    with torch.no_grad():
        batch = batch_for(model, False)
        got = model.term_logps(batch, [(batch["user_rows"], None)], full_logits=True)[0]
        assert torch.allclose(got, oracle(model), atol=1e-4)

    from prlhf.config import PDPOConfig
    from prlhf.trainers.pdpo import PDPOTrainer

    args = PDPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, max_steps=1,
                      reference_cache_dir="none", n_user_tokens=3)
    with pytest.raises(ValueError, match="packing"):
        PDPOTrainer(model=model, args=args, train_dataset=two_user_records(n_prompts=2))
    args = PDPOConfig(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, max_steps=1,
                      reference_cache_dir="none", n_user_tokens=3, packing=False)
    PDPOTrainer(model=model, args=args, train_dataset=two_user_records(n_prompts=2)).train()
