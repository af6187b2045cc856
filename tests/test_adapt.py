"""New users after training (prlhf.adapt): few-shot adaptation touches only the adapted users,
learns a new user's preference from a few pairs, active questions rank informative pairs first,
and export / removal keep every other user bit-identical."""

import copy
import json

import pytest
import torch
from conftest import build_model, collate, two_user_records

from prlhf.adapt import adapt_users, disagreement_scores, suggest_pairs
from prlhf.cli import main
from prlhf.config import PDPOConfig
from prlhf.evaluation import evaluate_accuracy
from prlhf.modeling import PersonalizedLM
from prlhf.persistence import export_user, list_users, remove_user
from prlhf.storage import sha256_file, verify_manifest
from prlhf.trainers.pdpo import PDPOTrainer


def renamed(records, old, new):
    return [dict(r, user_id=new) for r in records if r["user_id"] == old]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A P-DPO model that learned two opposite users (long_fan, short_fan) on 24 prompts."""
    out = tmp_path_factory.mktemp("trained")
    records = two_user_records(n_prompts=24)
    args = PDPOConfig(output_dir=str(out / "model"), report_to="none", use_cpu=True, disable_tqdm=True,
                      per_device_train_batch_size=8, learning_rate=1e-3, user_learning_rate=1e-2, n_user_tokens=4,
                      num_train_epochs=3, save_strategy="no", logging_steps=100, user_model="individual",
                      reference_model_name_or_path="tiny-llama", weight_decay=0.0)
    trainer = PDPOTrainer(args=args, train_dataset=records)
    trainer.train()
    trainer.save_model()
    return out / "model"


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_adapt_moves_only_the_new_users_parameters(tmp_path, kind):
    model = build_model(kind, users=("a", "b", "c"), n_clusters=3)
    reference = copy.deepcopy(model.llm).eval()
    model.save_pretrained(tmp_path / "before")
    llm_before, um_before = state(model.llm), state(model.user_model)
    new = renamed(two_user_records(n_prompts=4, users=("short_fan",)), "short_fan", "d")
    result = adapt_users(model, new, reference, steps=5, learning_rate=0.1)
    assert result.new_users == ["d"] and result.n_pairs == 4 and len(result.loss) == 5
    assert model.registry.row("d") == 4 and model.registry.pair_counts["d"] == 4
    for k, v in state(model.llm).items():
        assert torch.equal(v, llm_before[k]), k
    after = state(model.user_model)
    if kind == "individual":
        assert torch.equal(after["generic"], um_before["generic"])
        assert torch.equal(after["offsets"][:3], um_before["offsets"])  # users a, b, c
        assert after["offsets"][3].abs().sum() > 0  # d started at 0 (= e_0) and moved
    else:
        assert torch.equal(after["clusters"], um_before["clusters"])
        assert torch.equal(after["user_logits"][:4], um_before["user_logits"])  # generic, a, b, c
        assert not torch.equal(after["user_logits"][4], um_before["user_logits"][0])  # d started as the generic mix
    assert all(p.requires_grad for p in model.user_model.parameters())  # flags restored
    model.save_pretrained(tmp_path / "after")
    # the saved base weights are the same bytes
    assert sha256_file(tmp_path / "after" / "model.safetensors") == sha256_file(tmp_path / "before" / "model.safetensors")
    loaded = PersonalizedLM.from_pretrained(tmp_path / "after")
    assert "d" in loaded.registry and loaded.registry.pair_counts["d"] == 4


def test_new_user_starts_as_generic_and_reset_or_continue(tmp_path):
    model = build_model("individual", users=("a", "b"))
    reference = copy.deepcopy(model.llm).eval()
    with torch.no_grad():
        generic = model.user_model(torch.tensor([0]))
    pairs = renamed(two_user_records(n_prompts=3, users=("short_fan",)), "short_fan", "new")
    adapt_users(model, pairs, reference, steps=0)  # registered, not fitted: the generic user's embedding
    assert torch.equal(model.user_model(torch.tensor([model.registry.row("new")])), generic)
    a_params = model.user_model.user_parameters(model.registry.row("a"))
    a_pairs = renamed(pairs, "new", "a")
    adapt_users(model, a_pairs, reference, steps=0)  # an existing user continues from their parameters
    assert torch.equal(model.user_model.user_parameters(model.registry.row("a")), a_params)
    assert model.registry.pair_counts["a"] == 3  # build_model's registry recorded no counts: these 3 are the first
    adapt_users(model, a_pairs, reference, steps=2, learning_rate=0.1)
    assert model.registry.pair_counts["a"] == 6
    moved = model.user_model.user_parameters(model.registry.row("a"))
    assert not torch.equal(moved, a_params)
    adapt_users(model, a_pairs, reference, steps=0, reset=True)  # --reset: back to the generic user
    assert torch.equal(model.user_model.user_parameters(model.registry.row("a")), torch.zeros_like(a_params))
    assert model.registry.pair_counts["a"] == 3


def test_adapt_refuses_models_and_records_it_cannot_fit():
    uniform = build_model("uniform", users=("a",))
    with pytest.raises(ValueError, match="individual or cluster"):
        adapt_users(uniform, two_user_records(n_prompts=1), None, steps=1)
    model = build_model("individual", users=("a",))
    with pytest.raises(ValueError, match="record 1: field 'user_id'"):
        adapt_users(model, [{"user_id": "x", "prompt": "p", "chosen": "a", "rejected": "b"},
                            {"prompt": "p", "chosen": "a", "rejected": "b"}], None, steps=1, name="new.jsonl")


def test_adapt_learns_a_new_minority_user_from_eight_pairs(trained):
    from prlhf.reference import load_reference

    model = PersonalizedLM.from_pretrained(trained)
    reference = load_reference(model)  # the recorded pi_SFT
    pool = renamed(two_user_records(n_prompts=24, seed=7, users=("short_fan",)), "short_fan", "newbie")
    train, held_out = pool[:8], pool[8:]
    before = evaluate_accuracy(model, held_out, reference)["accuracy"]["overall"]  # unknown id: the generic user
    result = adapt_users(model, train, reference, steps=30, learning_rate=3e-2)
    after = evaluate_accuracy(model, held_out, reference)["accuracy"]["overall"]
    seen = evaluate_accuracy(model, two_user_records(n_prompts=24), reference)["accuracy"]["seen"]
    assert after >= 0.9 and after >= seen - 0.1, (before, after, seen)
    assert after > before + 0.2
    assert result.train_accuracy >= 0.9


def test_active_questions_rank_pairs_the_users_disagree_on_first(trained):
    from prlhf.reference import load_reference

    model = PersonalizedLM.from_pretrained(trained)
    reference = load_reference(model)
    informative = two_user_records(n_prompts=4, seed=3, users=("long_fan",))  # long vs short: the users disagree
    same = [dict(r, rejected=r["chosen"]) for r in two_user_records(n_prompts=4, seed=4, users=("long_fan",))]
    candidates = [c for pair in zip(same, informative) for c in pair]  # interleaved
    scores = disagreement_scores(model, candidates, reference)
    assert min(scores[1::2]) > max(scores[0::2]), scores  # identical responses: no disagreement at all
    picked = suggest_pairs(model, candidates, 4, reference)
    assert sorted(picked) == [1, 3, 5, 7]
    assert len(set(suggest_pairs(model, candidates, 4, reference, strategy="random"))) == 4


def test_remove_user_leaves_every_other_user_bit_identical(tmp_path):
    model = build_model("individual", users=("a", "b", "c"))
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    batch = collate(model, two_user_records(n_prompts=2, users=("a", "b", "c")))
    rows = batch["user_rows"]

    def logps(m, ids):
        with torch.no_grad():
            return m.term_logps(batch, [(m.user_rows_for(ids), None)])[0]

    ids = [model.registry.ids[r - 1] for r in rows.tolist()]
    before = logps(model, ids)
    exported = export_user(folder, "b")
    assert set(exported) >= {"user_id", "parameters", "user_text", "n_pairs"}
    assert torch.equal(torch.tensor(exported["parameters"]["offsets"]), model.user_model.offsets[1].detach())
    removed = remove_user(folder, "b")
    assert removed["row"] == 2
    assert verify_manifest(folder, required=True)
    after_model = PersonalizedLM.from_pretrained(folder)
    assert "b" not in after_model.registry and after_model.registry.row("c") == 2
    after = logps(after_model, ids)
    keep = torch.tensor([i != "b" for i in ids] * 2)
    assert torch.equal(after[keep], before[keep])  # a and c: the same log-probs, bit for bit
    generic = logps(model, [None] * len(ids))
    assert torch.equal(after[~keep], generic[~keep])  # b is the generic user now
    with pytest.raises(KeyError):
        export_user(folder, "b")
    assert [u["user_id"] for u in list_users(folder)] == ["a", "c"]


def test_cli_adapt_suggest_and_users(tmp_path, trained, capsys):
    data = tmp_path / "new.jsonl"
    pool = renamed(two_user_records(n_prompts=12, seed=9, users=("short_fan",)), "short_fan", "zoe")
    data.write_text("".join(json.dumps(r) + "\n" for r in pool[:8]))
    out = tmp_path / "adapted"
    assert main(["adapt", "--model", str(trained), "--data", str(data), "--output", str(out), "--steps", "5"]) == 0
    assert "adapted 1 users (1 new) on 8 pairs" in capsys.readouterr().out
    assert (out / "adaptation.json").is_file() and (out / "training_args.json").is_file()
    assert main(["users", "list", "--model", str(out), "--json"]) == 0
    users = json.loads(capsys.readouterr().out)
    assert [u["user_id"] for u in users] == ["long_fan", "short_fan", "zoe"] and users[2]["n_pairs"] == 8
    assert main(["users", "export", "--model", str(out), "--user", "zoe"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["n_pairs"] == 8 and len(exported["parameters"]["offsets"]) == 4
    cand = tmp_path / "cand.jsonl"
    cand.write_text("".join(json.dumps(r) + "\n" for r in pool[8:]))
    picked = tmp_path / "ask.jsonl"
    assert main(["adapt", "--model", str(out), "--suggest", "2", "--candidates", str(cand), "--output", str(picked),
                 "--user", "zoe"]) == 0
    asked = [json.loads(line) for line in picked.read_text().splitlines()]
    assert len(asked) == 2 and all(r["user_id"] == "zoe" and "suggest_rank" in r for r in asked)
    assert main(["users", "remove", "--model", str(out), "--user", "zoe"]) == 0
    assert main(["users", "export", "--model", str(out), "--user", "zoe"]) == 2  # gone: a clear error, no traceback
    assert "no user 'zoe'" in capsys.readouterr().err
    assert main(["adapt", "--model", str(out), "--data", str(data)]) == 2  # no --output
