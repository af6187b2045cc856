"""Cost flat in the number of users: sparse per-user gradients equal the dense ones, lazy row
updates equal AdamW where every row is in every batch and leave absent rows untouched, clipping
and checkpoints work with them, and the user-scale benchmark writes its JSON contract."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import two_user_records

from prlhf.base_models import tiny_llama
from prlhf.config import PDPOConfig, PersonalizationConfig
from prlhf.modeling import PersonalizedLM
from prlhf.optim import CombinedOptimizer, clip_grad_norm_
from prlhf.trainers.pdpo import PDPOTrainer
from prlhf.user_models import build_user_model, gather_rows
from prlhf.users import UserRegistry

ROOT = Path(__file__).resolve().parents[1]


def test_gather_rows_sparse_gradient_equals_the_dense_one():
    table = torch.nn.Parameter(torch.randn(6, 2, 3))
    index = torch.tensor([4, 1, 4, 0])  # a repeated row: its gradients add up
    weights = torch.randn(4, 2, 3)
    (gather_rows(table, index, sparse=True) * weights).sum().backward()
    sparse = table.grad
    table.grad = None
    (gather_rows(table, index, sparse=False) * weights).sum().backward()
    assert sparse.is_sparse and not table.grad.is_sparse
    assert torch.equal(sparse.to_dense(), table.grad)
    assert sparse.coalesce().indices().tolist() == [[0, 1, 4]]  # only the batch's rows


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_user_models_give_the_same_embeddings_with_sparse_rows(kind):
    um = build_user_model(kind, 5, 2, 8, n_clusters=3, offset_init="random", token_embeddings=torch.randn(50, 8))
    rows = torch.tensor([0, 3, 3, 1])
    dense = um(rows)
    um.sparse_rows = True
    assert torch.equal(um(rows), dense)
    um(rows).sum().backward()
    assert getattr(um, um.per_user_param).grad.is_sparse


def test_clip_grad_norm_with_sparse_gradients_equals_torch_on_dense():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    index = torch.tensor([2, 0, 2])
    loss = (gather_rows(a, index, sparse=True) ** 2).sum() + (b ** 3).sum()
    loss.backward()
    dense_a, dense_b = a.grad.to_dense().clone(), b.grad.clone()
    total = clip_grad_norm_([a, b], 1.0)
    pa, pb = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    pa.grad, pb.grad = dense_a, dense_b
    expected = torch.nn.utils.clip_grad_norm_([pa, pb], 1.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5) and total.item() > 1.0  # really clipped
    assert torch.allclose(a.grad.to_dense(), pa.grad, atol=1e-6) and torch.allclose(b.grad, pb.grad, atol=1e-6)


def _trainer(tmp_path, mode, users=("long_fan", "short_fan"), records=None, **kw):
    llm, tok = tiny_llama()
    cfg = PersonalizationConfig("tiny-llama", user_model=kw.get("user_model", "individual"), n_user_tokens=2,
                                user_offset_init="vocab")
    model = PersonalizedLM.build(cfg, UserRegistry(users), llm=llm, tokenizer=tok)
    settings = dict(output_dir=str(tmp_path / mode), report_to="none", use_cpu=True, disable_tqdm=True,
                    per_device_train_batch_size=4, learning_rate=1e-3, user_learning_rate=1e-2, n_user_tokens=2,
                    save_strategy="no", logging_steps=1, train_sampling_strategy="sequential", weight_decay=0.0,
                    user_rows_update=mode)
    args = PDPOConfig(**{**settings, **kw})
    return PDPOTrainer(model=model, args=args, train_dataset=records or two_user_records(n_prompts=4))


@pytest.mark.parametrize("user_model", ["individual", "cluster"])
def test_lazy_rows_equal_adamw_when_every_row_is_in_every_batch(tmp_path, user_model):
    """two_user_records alternates the users: each batch of 4 holds both, so lazy Adam on their
    rows is Adam on them, and training matches the dense optimizer step for step."""
    runs = {}
    for mode in ("dense", "lazy"):
        trainer = _trainer(tmp_path / user_model, mode, max_steps=3, user_model=user_model)
        um = trainer.model.user_model
        before = getattr(um, um.per_user_param).detach().clone()
        trainer.train()
        runs[mode] = trainer
    assert isinstance(runs["lazy"].optimizer.optimizer, CombinedOptimizer)
    assert not isinstance(runs["dense"].optimizer.optimizer, CombinedOptimizer)
    for (n, p), (_, q) in zip(runs["dense"].model.named_parameters(), runs["lazy"].model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    um = runs["lazy"].model.user_model
    assert um.sparse_rows and not torch.equal(getattr(um, um.per_user_param), before)  # the rows trained


def test_lazy_rows_leave_absent_users_untouched_and_resume_exactly(tmp_path):
    users = [f"user_{i}" for i in range(50)]
    records = [dict(r, user_id=u) for r, u in zip(two_user_records(n_prompts=8), ["user_3", "user_40"] * 8)]
    trainer = _trainer(tmp_path, "lazy", users=users, records=records, max_steps=4)
    um = trainer.model.user_model
    before = um.offsets.detach().clone()
    trainer.train()
    changed = (um.offsets.detach() != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [3, 40]  # the offsets of user_3 and user_40 (rows 4 and 41: user_0 is row 1)
    # checkpoints carry both optimizers' state: an interrupted run resumes to the same weights
    cut = _trainer(tmp_path / "cut", "lazy", users=users, records=records, max_steps=4, save_strategy="steps",
                   save_steps=2)
    cut.train()
    resumed = _trainer(tmp_path / "cut", "lazy", users=users, records=records, max_steps=4)
    (tmp_path / "cut" / "lazy" / "checkpoint-4" / "trainer_state.json").unlink()  # resume from checkpoint-2
    resumed.train(resume_from_checkpoint=True)
    for (n, p), (_, q) in zip(trainer.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_auto_is_lazy_from_a_thousand_users(tmp_path):
    few = _trainer(tmp_path / "few", "auto", max_steps=1)
    assert few.lazy_user_table() is None
    many = _trainer(tmp_path / "many", "auto", users=[f"u{i}" for i in range(1000)],
                    records=[dict(r, user_id="u7") for r in two_user_records(n_prompts=2)], max_steps=1)
    assert many.lazy_user_table() is many.model.user_model.offsets
    with pytest.raises(ValueError, match="user_rows_update"):
        PDPOConfig(output_dir=str(tmp_path / "x"), user_rows_update="sometimes")


def test_user_scale_benchmark_writes_the_json_contract(tmp_path):
    out = tmp_path / "scale.json"
    sizes = json.dumps({"individual": [10, 1000], "cluster": [10, 1000]})
    cmd = [sys.executable, str(ROOT / "benchmarks" / "user_scale.py"), "--json", str(out), "--hidden-size", "64",
           "--steps", "1", "--warmup", "0", "--batch-size", "4", "--sizes", sizes, "--no-dense"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("step_seconds", "peak_rss_mb"):
        assert set(result[key]) == {"individual", "cluster"}
        for kind in ("individual", "cluster"):
            assert set(result[key][kind]) == {"10", "1000"} and all(v > 0 for v in result[key][kind].values())
    assert result["optimizer"]["individual"]["1000"] == "CombinedOptimizer"  # auto: lazy at 1,000 users
    assert result["optimizer"]["individual"]["10"] != "CombinedOptimizer"
    assert "| individual | 1,000 |" in proc.stdout
