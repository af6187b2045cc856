"""Evaluation scores against the reference that training used: an explicit reference object, a
reference path, or the LoRA base (adapters disabled), with LoRA and without. The reference
log-probs that evaluation computes (in the same session through ``reference_for_eval`` and from
the saved folder through ``load_reference``) equal the ones the trainer trained against, so the
implicit rewards at evaluation are those of the last training step. Dropout is off by default."""

import pytest
import torch
from conftest import two_user_records

from prlhf.base_models import load_model_and_tokenizer, tiny_llama
from prlhf.collate import PreferenceCollator
from prlhf.config import PDPOConfig
from prlhf.modeling import PersonalizedLM
from prlhf.reference import load_reference, reference_pair_logps
from prlhf.trainers.base import disable_dropout
from prlhf.trainers.pdpo import PDPOTrainer


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """pi_SFT: tiny-llama moved away from the base, saved as a folder."""
    path = tmp_path_factory.mktemp("ref")
    llm, tok = tiny_llama()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    llm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_args(tmp_path, **kw):
    return PDPOConfig(model_name_or_path="tiny-llama", output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                      disable_tqdm=True, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, n_user_tokens=2,
                      save_strategy="no", lora_r=4, lora_alpha=8, **kw)


def ref_logps(model: PersonalizedLM, examples, reference) -> torch.Tensor:
    tok = model.tokenizer
    batch = PreferenceCollator(tok.pad_token_id, tok.bos_token_id, model.n_implicit_tokens, "right")(examples)
    return reference_pair_logps(model, batch, reference)  # (2B,) chosen then rejected


CASES = {
    "path": dict(use_lora=False, ref="path"),
    "object": dict(use_lora=False, ref="object"),
    "lora_base": dict(use_lora=True, ref=None),
    "lora_path": dict(use_lora=True, ref="path"),
    "lora_object": dict(use_lora=True, ref="object"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_evaluation_reference_is_the_training_reference(tmp_path, reference_dir, case):
    use_lora, ref = CASES[case]["use_lora"], CASES[case]["ref"]
    kw = {"reference_model_name_or_path": reference_dir} if ref == "path" else {}
    reference = load_model_and_tokenizer(reference_dir)[0] if ref == "object" else None
    trainer = PDPOTrainer(args=make_args(tmp_path, use_lora=use_lora, **kw), train_dataset=two_user_records(n_prompts=4),
                          reference_model=reference)
    trainer.train()
    trainer.save_model()
    examples = trainer.train_dataset[:6]
    trained = torch.tensor([[ex["ref_logps"][0] for ex in examples] + [ex["ref_logps"][1] for ex in examples]])[0]
    model = trainer.model

    # the same session
    assert torch.allclose(ref_logps(model, examples, trainer.reference_for_eval()), trained, atol=1e-5)
    # the saved folder, as `prlhf eval` loads it
    saved = PersonalizedLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(ref_logps(saved, examples, load_reference(saved)), trained, atol=1e-5)
    # the check can fail: the base model's log-probs differ from pi_SFT's unless the base is the reference
    base = load_model_and_tokenizer("tiny-llama")[0]
    differs = not torch.allclose(ref_logps(model, examples, base), trained, atol=1e-3)
    assert differs == (ref is not None)
    if ref == "object":
        assert saved.prlhf_config.reference_model_name_or_path.endswith(reference_dir.rsplit("/", 1)[-1])


def test_reference_object_without_a_name_is_kept_for_eval_and_not_recorded(tmp_path, reference_dir):
    reference = load_model_and_tokenizer(reference_dir)[0]
    reference.name_or_path = ""
    reference.config._name_or_path = ""
    trainer = PDPOTrainer(args=make_args(tmp_path), train_dataset=two_user_records(n_prompts=4), reference_model=reference)
    trainer.train()
    trainer.save_model()
    assert trainer.reference_for_eval() is reference
    saved = PersonalizedLM.from_pretrained(tmp_path / "out")
    assert saved.prlhf_config.reference_model_name_or_path is None
    with pytest.raises(ValueError, match="--reference"):
        load_reference(saved)


def test_dropout_is_disabled_by_default(tmp_path):
    from transformers import LlamaForCausalLM

    llm, tok = tiny_llama()
    config = llm.config
    config.attention_dropout = 0.3
    noisy = LlamaForCausalLM(config)
    extra = torch.nn.Dropout(0.5)
    noisy.add_module("extra_dropout", extra)
    noisy.train()
    disable_dropout(noisy)
    assert extra.p == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in noisy.model.layers)
    ids = torch.tensor([[1, 5, 9, 11, 13]])
    torch.manual_seed(0)
    a = noisy(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(a, noisy(input_ids=ids).logits)  # train mode, yet deterministic

    args = make_args(tmp_path, use_lora=True, lora_dropout=0.5)
    assert args.disable_dropout is True
    trainer = PDPOTrainer(args=args, train_dataset=two_user_records(n_prompts=2))
    assert all(m.p == 0.0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))
    kept = PDPOTrainer(args=make_args(tmp_path, use_lora=True, lora_dropout=0.5, disable_dropout=False),
                       train_dataset=two_user_records(n_prompts=2))
    assert any(m.p == 0.5 for m in kept.model.modules() if isinstance(m, torch.nn.Dropout))
