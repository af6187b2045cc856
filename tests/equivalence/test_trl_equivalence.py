"""Vanilla equivalence: P-DPO with no user model is DPO; its loss equals TRL's DPOTrainer's to 1e-5."""

import math

import pytest
import torch

pytest.importorskip("trl")

from conftest import two_user_records  # noqa: E402

from prlhf.base_models import tiny_llama  # noqa: E402
from prlhf.config import (
    PDPOConfig,  # noqa: E402
    PersonalizationConfig,
)
from prlhf.modeling import PersonalizedLM  # noqa: E402
from prlhf.trainers.pdpo import PDPOTrainer  # noqa: E402
from prlhf.users import UserRegistry  # noqa: E402

BETA = 0.3


def moved_policy():
    """A tiny policy that has moved away from the reference (tiny_llama() with the same seed)."""
    llm, tok = tiny_llama()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return llm, tok


def trl_loss(llm, tok, records, tmp_path) -> float:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    reference, _ = tiny_llama()
    # TRL defaults to bf16 autocast; compare in float32, as prlhf computes
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, loss_type=["sigmoid"], max_length=None,
                     report_to="none", use_cpu=True, bf16=False)
    ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
    trainer = DPOTrainer(model=llm, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(records))])
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def prlhf_trainer(llm, tok, records, tmp_path, user_model="none", alpha=0.5, reference=None):
    args = PDPOConfig(output_dir=str(tmp_path / "p"), beta=BETA, alpha=alpha, user_model=user_model, n_user_tokens=2,
                      max_length=None, max_prompt_length=None, report_to="none", use_cpu=True)
    cfg = PersonalizationConfig("tiny-llama", user_model=user_model, n_user_tokens=2)
    model = PersonalizedLM.build(cfg, UserRegistry.from_records(records), llm=llm, tokenizer=tok)
    return PDPOTrainer(model=model, args=args, train_dataset=records, reference_model=reference)


def prlhf_loss(trainer) -> float:
    batch = trainer.data_collator(trainer.train_dataset)
    with torch.no_grad():
        loss, _ = trainer.pdpo_loss(trainer.model, batch)
    return loss.item()


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_no_user_model_equals_trl_dpo(tmp_path, alpha):
    records = two_user_records(n_prompts=4)
    llm, tok = moved_policy()
    reference, _ = tiny_llama()
    got = prlhf_loss(prlhf_trainer(llm, tok, records, tmp_path, "none", alpha, reference))
    expected = trl_loss(llm, tok, records, tmp_path)
    assert abs(expected - math.log(2)) > 1e-2  # the policy really differs from the reference
    assert got == pytest.approx(expected, abs=1e-5)


def test_default_reference_is_the_starting_policy(tmp_path):
    """Without a reference model, the frozen copy of the starting policy is pi_SFT: loss log 2 at step 0."""
    records = two_user_records(n_prompts=4)
    llm, tok = tiny_llama()
    assert prlhf_loss(prlhf_trainer(llm, tok, records, tmp_path)) == pytest.approx(math.log(2), abs=1e-6)


def test_uniform_user_model_loss_does_not_depend_on_alpha(tmp_path, monkeypatch):
    """Uniform cannot tell users apart: the generic term equals the user term, so alpha changes
    nothing. Both terms are really computed and mixed by alpha here (the shortcut that skips the
    generic pass is switched off), and the result equals the one-pass loss for every alpha."""
    records = two_user_records(n_prompts=4)
    losses = []
    for alpha in (1.0, 0.5, 0.0):
        llm, tok = moved_policy()
        trainer = prlhf_trainer(llm, tok, records, tmp_path, "uniform", alpha, tiny_llama()[0])
        assert trainer.terms_needed(trainer.model) == (True, False)  # one forward pass
        one_pass = prlhf_loss(trainer)
        monkeypatch.setattr(trainer, "terms_needed", lambda pm: (True, True))
        both = prlhf_loss(trainer)
        monkeypatch.undo()
        assert both == pytest.approx(one_pass, abs=1e-6)
        losses.append(both)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and losses[0] == pytest.approx(losses[2], abs=1e-6)
    assert abs(losses[0] - math.log(2)) > 1e-3


def test_individual_user_model_loss_does_depend_on_alpha(tmp_path):
    """The control for the test above: users that differ make alpha matter."""
    records = two_user_records(n_prompts=4)
    losses = []
    for alpha in (1.0, 0.0):
        llm, tok = moved_policy()
        trainer = prlhf_trainer(llm, tok, records, tmp_path, "individual", alpha, tiny_llama()[0])
        with torch.no_grad():
            trainer.model.user_model.offsets.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        losses.append(prlhf_loss(trainer))
    assert abs(losses[0] - losses[1]) > 1e-3
