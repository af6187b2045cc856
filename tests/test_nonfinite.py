"""NaN and inf never pass silently: training stops at the first non-finite loss, gradient or weight
(exit code 3, "non-finite"), the last good checkpoint stays, non-finite weights are never saved, and
non-finite reference log-probs are neither cached nor reused."""

import json

import pytest
import torch
import yaml
from conftest import build_model, two_user_records
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from prlhf.cli import main
from prlhf.config import PDPOConfig
from prlhf.guards import NonFiniteError
from prlhf.reference import cached_reference_logps
from prlhf.storage import verify_manifest
from prlhf.trainers.base import latest_checkpoint
from prlhf.trainers.pdpo import PDPOTrainer


def config(tmp_path, **over):
    kw = dict(output_dir=str(tmp_path / "out"), model_name_or_path="tiny-llama", user_model="individual", n_user_tokens=2,
              learning_rate=1e-3, per_device_train_batch_size=4, max_steps=5, save_strategy="steps", save_steps=1,
              report_to="none", use_cpu=True, disable_tqdm=True, reference_cache_dir="none", logging_steps=1)
    return PDPOConfig(**{**kw, **over})


class PoisonBeta(TrainerCallback):
    """Makes beta NaN after step ``at``: the next step's loss is NaN."""

    def __init__(self, trainer_args, at):
        self.trainer_args, self.at = trainer_args, at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            self.trainer_args.beta = float("nan")


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    args = config(tmp_path)
    trainer = PDPOTrainer(args=args, train_dataset=two_user_records(n_prompts=8))
    trainer.add_callback(PoisonBeta(trainer.args, at=2))
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(NaN or inf\) at step 3: .*user term of the loss"):
        trainer.train()
    out = tmp_path / "out"
    assert latest_checkpoint(out) == str(out / "checkpoint-2")
    assert not (out / "checkpoint-3").exists()
    assert not (out / "prlhf_config.json").exists()  # no final model was written
    ckpt = out / "checkpoint-2"
    assert verify_manifest(ckpt, required=True)
    for name in ("model.safetensors", "user_model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / name)).values())


def write_recipe(tmp_path, **over):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in two_user_records(n_prompts=4)))
    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "tiny-llama", "train_file": str(train), "output_dir": str(tmp_path / "out"),
                                   "n_user_tokens": 2, "per_device_train_batch_size": 4, "max_steps": 3,
                                   "save_strategy": "steps", "save_steps": 1, "report_to": "none", "disable_tqdm": True,
                                   "use_cpu": True, "reference_cache_dir": "none", **over}))
    return cfg


@pytest.mark.parametrize("flag,value,fragment", [
    ("--learning_rate", "1e39", "non-finite values (NaN or inf) in the weights after step 1"),  # inf in float32
    ("--user_learning_rate", "1e39", "non-finite values (NaN or inf) in the weights after step 1: user_model"),
])
def test_cli_exits_3_on_non_finite_values(tmp_path, capsys, flag, value, fragment):
    cfg = write_recipe(tmp_path)
    assert main(["train", "--config", str(cfg), flag, value]) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and fragment in err and "Traceback" not in err
    assert latest_checkpoint(tmp_path / "out") is None  # the broken step was never checkpointed


def test_non_finite_weights_are_never_saved(tmp_path):
    model = build_model()
    with torch.no_grad():
        model.user_model.offsets[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="user_model.offsets"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_non_finite_reference_cache_is_recomputed_and_non_finite_reference_refused(tmp_path):
    examples = [{}] * 3
    bad = torch.tensor([[-1.0, -2.0], [float("nan"), -1.0], [-3.0, -4.0]])
    save_file({"logps": bad}, str(tmp_path / "k.safetensors"))
    good = torch.tensor([[-1.0, -2.0], [-1.5, -1.0], [-3.0, -4.0]])
    logps, hit, _ = cached_reference_logps(examples, "k", lambda: good, tmp_path)
    assert not hit and torch.equal(logps, good)  # the NaN file was not trusted
    assert torch.equal(load_file(str(tmp_path / "k.safetensors"))["logps"], good)
    with pytest.raises(NonFiniteError, match="non-finite reference log-probs .* 1 of 3 pairs"):
        cached_reference_logps(examples, "k2", lambda: bad, tmp_path)
    assert not (tmp_path / "k2.safetensors").exists()
