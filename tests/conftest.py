"""Shared fixtures: a tiny random Llama (offline) and small per-user preference data."""

import atexit
import os
import random
import shutil
import tempfile

import pytest
import torch

from prlhf.base_models import tiny_llama
from prlhf.config import PersonalizationConfig
from prlhf.data import TokenizeSettings, load_preference_data, tokenize_dataset
from prlhf.modeling import PersonalizedLM
from prlhf.users import UserRegistry

# reference log-probs cached by the tests stay out of the user's ~/.cache
if "PRLHF_REFERENCE_CACHE" not in os.environ:
    os.environ["PRLHF_REFERENCE_CACHE"] = _cache = tempfile.mkdtemp(prefix="prlhf-test-refcache-")
    atexit.register(shutil.rmtree, _cache, True)

WORDS = "the dog cat runs fast slow big small house tree river sun moon day night".split()


def two_user_records(n_prompts: int = 16, seed: int = 0, users=("long_fan", "short_fan")) -> list[dict]:
    """Users with opposite length preferences on the same prompts."""
    rng = random.Random(seed)
    recs = []
    for _ in range(n_prompts):
        prompt = "Q: " + " ".join(rng.choices(WORDS, k=5)) + "\nA:"
        short = " " + " ".join(rng.choices(WORDS, k=2))
        long = " " + " ".join(rng.choices(WORDS, k=12))
        for u in users:
            chosen, rejected = (long, short) if u.startswith("long") else (short, long)
            recs.append({"user_id": u, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return recs


def build_model(user_model="individual", n_tokens=3, users=("a", "b", "c"), seed=0, randomize=True, **cfg):
    llm, tok = tiny_llama()
    config = PersonalizationConfig(base_model_name_or_path="tiny-llama", user_model=user_model,
                                   n_user_tokens=n_tokens, seed=seed, **cfg)
    model = PersonalizedLM.build(config, UserRegistry(users), llm=llm, tokenizer=tok)
    if randomize and model.user_model is not None:  # make users differ (offsets start at 0)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.user_model.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


def collate(model, records, side="right", **settings):
    settings = TokenizeSettings(n_user_tokens=model.n_implicit_tokens,
                                max_user_text_tokens=model.prlhf_config.max_user_text_tokens, **settings)
    examples = tokenize_dataset(load_preference_data(records), model.tokenizer, settings, model.registry)
    return model.collator(side)(examples)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each sequence.

    logits (N, T, V) predict token t+1 at position t; labels (N, T) hold the token ids to score
    and -100 elsewhere. Returns (N,): sum_t log p(labels[t] | tokens < t).
    """
    labels = labels[:, 1:]  # (N, T-1)
    logits = logits[:, :-1]  # (N, T-1, V)
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (token_logps * mask).sum(-1)


def plain_logps(model, batch, user_rows):
    """log pi_P(y | x, u) summed over response tokens of a plain collated batch, for one user row
    per sequence (N,): full logits at every position, 2D mask (the plain reference computation)."""
    logits = model(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], user_rows)
    return sequence_logps(logits, batch["labels"])


@torch.no_grad()
def plain_reference_logps(model, batch, reference=None):
    """log pi_SFT(y | x) of a plain collated batch: user positions masked out, full logits;
    ``reference`` a frozen LM, or None for the model's base with its LoRA adapters disabled."""
    from prlhf.scoring import position_ids_from_mask

    attention_mask = batch["attention_mask"] * (~batch["user_mask"]).long()
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if reference is None:
        assert model.is_lora, "a reference model is needed unless the policy is a LoRA model"
        with model.llm.disable_adapter():
            logits = model.llm(input_ids=batch["input_ids"], **kwargs).logits
    else:
        logits = reference(input_ids=batch["input_ids"], **kwargs).logits
    return sequence_logps(logits, batch["labels"])


@pytest.fixture
def records():
    return two_user_records()


# records of three users and the generic user, with a user text: the fast-path checks' data
RECS = [
    {"user_id": "a", "prompt": "Tell me about dogs.", "chosen": " Dogs are loyal friends and good pets.", "rejected": " Dogs."},
    {"user_id": "b", "prompt": "What is money?", "chosen": " Money.", "rejected": " Money is a medium of exchange used to buy things.",
     "user_text": "I like short answers"},
    {"user_id": None, "prompt": "Hi", "chosen": " Hello there, how are you today?", "rejected": " Go away."},
    {"user_id": "c", "prompt": "Name a river in a big country far away.", "chosen": " The Nile.", "rejected": " Some river."},
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
