"""Training callbacks: a compact progress bar and the guard that stops at the first non-finite
gradient or weight."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..guards import NonFiniteError, check_finite
from ..optim import grad_values


class CompactProgressCallback(ProgressCallback):
    """A progress bar whose postfix shows the loss and the preference accuracy, instead of one
    printed dictionary per log step (per-user accuracies stay in ``state.log_history``)."""

    SHOWN = {"loss": "loss", "rewards/accuracies": "acc", "rewards_generic/accuracies": "acc_generic",
             "rewards/margins": "margin"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {short: f"{logs[key]:.3g}" for key, short in self.SHOWN.items() if isinstance(logs.get(key), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def use_compact_progress(trainer: Trainer) -> Trainer:
    """Swap the trainer's default progress printer for ``CompactProgressCallback``."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback())
    return trainer


class FiniteGuard(TrainerCallback):
    """Stops training at the first non-finite gradient (before the optimizer step) or weight (after
    it, before any checkpoint is written): the last checkpoint on disk stays the last good one."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, p in model.named_parameters():
                if p.grad is not None and not bool(torch.isfinite(grad_values(p.grad)).all()):
                    raise NonFiniteError(f"non-finite gradient (NaN or inf) at step {state.global_step + 1}: {name}; "
                                         "nothing of this step was applied or saved")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            try:
                check_finite(trainable, f"the weights after step {state.global_step}")
            except NonFiniteError as err:
                raise NonFiniteError(f"{err} (learning rate too large?); training stopped before saving them") from None
