"""The vLLM handoff, checked without vLLM: `prlhf export-vllm` writes a merged LLM and the users'
embeddings; plain transformers fed `UserPromptEmbedder`'s embeddings as `inputs_embeds` give the same
greedy tokens as `PersonalizedLM.generate`, for three users, in both generating layouts."""

import json

import pytest
import torch
from conftest import build_model
from transformers import AutoModelForCausalLM

from prlhf.cli import main
from prlhf.export import GENERIC_KEY, UserPromptEmbedder
from prlhf.modeling import PersonalizedLM

PROMPTS = ["Q: the river\nA:", "Q: a much longer question about the open sea\nA:", "Q: hi\nA:"]


def lora_model(position: str, seed: int = 0) -> PersonalizedLM:
    """A tiny P-DPO-shaped model: individual users, LoRA adapters with non-zero B (so that merging matters)."""
    model = build_model("individual", n_tokens=3, users=("a", "b"), seed=seed, use_lora=True, user_position=position)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.registry.user_texts["b"] = "I like short answers."
    return model


def greedy_from_embeds(llm, embeds: torch.Tensor, eos_id: int | None, n: int = 8) -> list[int]:
    """Greedy tokens from plain transformers given the prompt's embeddings (positions from 0)."""
    with torch.no_grad():
        out = llm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
                           max_new_tokens=n, do_sample=False, pad_token_id=eos_id)
    ids = out[0].tolist()
    return ids[:ids.index(eos_id) + 1] if eos_id in ids else ids


@pytest.mark.parametrize("position", ["prefix", "before_response"])
def test_exported_llm_fed_user_embeddings_generates_what_prlhf_generates(tmp_path, position):
    model = lora_model(position)
    model.save_pretrained(tmp_path / "model")
    assert main(["export-vllm", "--model", str(tmp_path / "model"), "--output", str(tmp_path / "vllm")]) == 0
    out = tmp_path / "vllm"
    for name in ("llm/config.json", "users.safetensors", "prlhf_export.json", "vllm_client.py", "README.md"):
        assert (out / name).is_file(), name
    assert not list((out / "llm").glob("adapter_*")), "the LoRA adapters are merged, not saved beside the LLM"
    cfg = json.loads((out / "prlhf_export.json").read_text())
    assert cfg["user_position"] == position and cfg["users"] == ["a", "b"] and cfg["n_implicit_tokens"] == 3

    loaded = PersonalizedLM.from_pretrained(tmp_path / "model")
    embedder = UserPromptEmbedder(out)
    llm = AutoModelForCausalLM.from_pretrained(out / "llm")
    llm.eval()
    eos = loaded.tokenizer.eos_token_id
    users = ["a", "b", None]  # a seen user, a seen user with a text, the generic user
    for prompt, user in zip(PROMPTS, users):
        mine = loaded.generate_ids(loaded.prepare_prompts([prompt], [user]), max_new_tokens=8, do_sample=False)[0].tolist()
        mine = mine[:mine.index(eos) + 1] if eos in mine else mine
        embeds = embedder(prompt, user)
        assert torch.equal(embeds, loaded.prompt_embeds(prompt, user))  # bit for bit the tensor prlhf feeds its LLM
        assert greedy_from_embeds(llm, embeds, eos) == mine, (position, user)
    # the users differ, an unknown user is the generic one, and a text alone serves a new user
    assert not torch.equal(embedder.implicit("a"), embedder.implicit("b"))
    assert torch.equal(embedder.implicit("nobody"), embedder.implicit(None))
    assert torch.equal(embedder.users[GENERIC_KEY], embedder.implicit(None))
    text_only = embedder(PROMPTS[0], None, "I like short answers.")
    assert torch.equal(text_only, loaded.prompt_embeds(PROMPTS[0], None, "I like short answers."))


def test_export_refuses_what_cannot_be_served(tmp_path, capsys):
    assert main(["export-vllm", "--model", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main(["export-vllm", "--model", str(tmp_path)]) == 2
    assert "--output" in capsys.readouterr().err
