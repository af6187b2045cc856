"""What every prlhf trainer shares: resuming from the newest complete checkpoint (and refusing
one that cannot be resumed), the non-finite guard, the sharding check, dropout off, the fast-path
check at start-up, and the ``PersonalizationConfig`` a training config describes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import Trainer

from ..config.training import PDPOConfig
from ..data import load_preference_data
from ..guards import NonFiniteError
from ..modeling import PersonalizedLM
from ..scoring import packing_refusal, verify_fast_paths
from ..storage import atomic_write_text
from ..users import UserRegistry
from .callbacks import FiniteGuard

TRAINER_STATE = "trainer_state.json"


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder: one whose ``trainer_state.json`` (written
    last by ``Trainer``) exists. A checkpoint cut off while being written is passed over."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _state_parses(p / TRAINER_STATE)]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None



def _state_parses(path: Path) -> bool:
    """A checkpoint is complete when its trainer state (written last) is there and parses."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False



def check_checkpoint(checkpoint: str | os.PathLike, registry: UserRegistry | None = None) -> None:
    """Refuse a checkpoint that cannot be resumed: missing, torn (its trainer state does not parse),
    or trained on other users than ``registry`` (the saved embeddings would go to other people)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    if not _state_parses(path / TRAINER_STATE):
        raise ValueError(f"resume_from_checkpoint: {path / TRAINER_STATE} is missing or does not parse: the checkpoint "
                         "was cut off while being written; resume from an earlier one (or pass --resume_from_checkpoint last)")
    users = path / "users.json"
    if registry is not None and users.is_file():
        saved = UserRegistry.load(users)
        if saved.ids != registry.ids:
            new, gone = sorted(set(registry.ids) - set(saved.ids)), sorted(set(saved.ids) - set(registry.ids))
            detail = (f"{len(new)} user(s) not in the checkpoint (e.g. {new[:3]}), {len(gone)} missing from the data "
                      f"(e.g. {gone[:3]})" if new or gone else "the same users in another order (other rows)")
            raise ValueError(f"resume_from_checkpoint: {path} was trained on other users than the training data: {detail}. "
                             "Resume with the data it was trained on, or start a new output_dir")



def check_fast_paths(model: PersonalizedLM, args: PDPOConfig, examples: list[dict]) -> None:
    """Refuse packing where it cannot be exact for this model and these sequence lengths, and
    verify packing and the response-only LM head on the first pairs (``ValueError`` naming the
    setting to turn off)."""
    if args.packing and examples:
        longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) + len(e.get("user_text_ids", []))
                      for e in examples) + model.n_implicit_tokens
        refusal = packing_refusal(model.llm, longest)
        if refusal:
            raise ValueError(refusal)
    problem = verify_fast_paths(model, examples, args.packing, args.response_logits_only)
    if problem:
        raise ValueError(problem)



def check_sharding(accelerator, args) -> None:
    """FSDP or DeepSpeed asked for (``--fsdp`` / ``--deepspeed``, or an ``accelerate launch``
    config) but not what accelerate runs: an error, instead of a silent data-parallel run that
    keeps a full copy of the model in every process. accelerate shards with FSDP and DeepSpeed on
    GPUs (and other accelerators); on CPUs it runs data parallel (DDP over gloo) and ignores both."""
    from accelerate.utils import DistributedType

    env = lambda k: os.environ.get(k, "false").lower() == "true"  # noqa: E731
    asked = {"FSDP": (bool(getattr(args, "fsdp", None)) or env("ACCELERATE_USE_FSDP"), DistributedType.FSDP),
             "DeepSpeed": (bool(getattr(args, "deepspeed", None)) or env("ACCELERATE_USE_DEEPSPEED"), DistributedType.DEEPSPEED)}
    running = accelerator.distributed_type
    for name, (wanted, kind) in asked.items():
        if wanted and running != kind:
            raise ValueError(
                f"{name} was asked for, but accelerate runs this job as {running.value}"
                + (" (CPUs: accelerate shards with FSDP and DeepSpeed on GPUs only, and would train data-parallel with a "
                   "full copy of the model in every process)" if args.use_cpu or not torch.cuda.is_available() else "")
                + f". Remove the {name} settings to train data-parallel (on CPUs: `accelerate launch --multi_gpu "
                  "--num_processes N ...`, gloo), or run on GPUs; the configs are in docs/performance.md.")



class ResumableTrainer(Trainer):
    """Resuming picks the newest complete checkpoint; weights are restored by the model's own loader.
    Non-finite losses, gradients and weights stop training (``FiniteGuard``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_sharding(self.accelerator, self.args)
        self.add_callback(FiniteGuard())

    def _registry(self) -> UserRegistry | None:
        return None

    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict gathered from the shards (every process must call it), or
        None when each process holds the whole model."""
        return self.accelerator.get_state_dict(self.model) if self.sharded() else None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-N folder")
        if resume_from_checkpoint:
            if self.sharded():
                raise ValueError(f"resuming from {resume_from_checkpoint}: checkpoints of a sharded run (FSDP, DeepSpeed) "
                                 "hold the gathered weights, which prlhf does not load back into shards; start a new run "
                                 "from the saved model folder (model_name_or_path), or resume without sharding")
            check_checkpoint(resume_from_checkpoint, self._registry())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteError(f"non-finite loss (NaN or inf) at step {self.state.global_step + 1}"
                                 f"{self._nonfinite_detail()}; nothing of this step was applied or saved")
        return loss

    def _nonfinite_detail(self) -> str:
        return ""

    def save_state(self) -> None:
        """``Trainer.save_state`` (``trainer_state.json`` in output_dir: log history, evaluations,
        health signal), written atomically."""
        if self.args.should_save:
            from dataclasses import asdict

            state = json.dumps(asdict(self.state), indent=2, sort_keys=True) + "\n"
            atomic_write_text(Path(self.args.output_dir) / TRAINER_STATE, state)



def disable_dropout(module: torch.nn.Module) -> None:
    """Turn off every dropout of a model (``nn.Dropout`` modules, LoRA's included, and the
    attention dropout rates that attention layers read from their config), as TRL's
    ``disable_dropout`` does: the policy's and the reference's log-probs are then deterministic."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)



def load_records(source, what: str):
    if source is None:
        raise ValueError(f"no {what} data: pass {what}_dataset or set {what}_file")
    return load_preference_data(source)
