"""Run by test_distributed.py, under `accelerate launch` or plain python: a few P-DPO steps on a
tiny model with prlhf's own Trainer; writes the logged loss trajectory to argv[2] (main process).

``argv[3] == "sgd"``: plain SGD without gradient clipping (the update is then proportional to the
gradient, so a wrong gradient scale changes the trajectory), and each parameter's gradient after the
first backward (after the processes' reduction) written to argv[2] + ".grads.safetensors".
``PRLHF_TEST_SUM_REDUCTION=1`` makes DDP sum the processes' gradients instead of averaging them:
the wrong reduction the gradient test must catch."""

import json
import os
import sys

import torch
from conftest import two_user_records
from transformers import TrainerCallback

from prlhf.config import PDPOConfig
from prlhf.trainers.pdpo import PDPOTrainer


class FirstGradients(TrainerCallback):
    """Keep every parameter's gradient at the first optimizer step (after DDP's all-reduce); with
    PRLHF_TEST_SUM_REDUCTION, sum instead of averaging in DDP's all-reduce."""

    def __init__(self, trainer, path):
        self.trainer, self.path, self.done = trainer, path, False

    def on_step_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if state.global_step == 0 and os.environ.get("PRLHF_TEST_SUM_REDUCTION") and hasattr(wrapped, "register_comm_hook"):
            import torch.distributed as dist

            def sum_hook(_, bucket):
                return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

            wrapped.register_comm_hook(None, sum_hook)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.done:
            return
        self.done = True
        if self.trainer.is_world_process_zero():
            from safetensors.torch import save_file

            grads = {n: p.grad.detach().clone().contiguous() for n, p in self.trainer.model.named_parameters()
                     if p.grad is not None}
            save_file(grads, self.path)


if __name__ == "__main__":
    per_device, out = int(sys.argv[1]), sys.argv[2]
    sgd = len(sys.argv) > 3 and sys.argv[3] == "sgd"
    extra = dict(optim="sgd", max_grad_norm=0.0, learning_rate=0.1, user_learning_rate=0.1) if sgd else \
        dict(learning_rate=1e-3, user_learning_rate=1e-2)
    args = PDPOConfig(output_dir=out + ".run", report_to="none", use_cpu=True, disable_tqdm=True, max_steps=4, health_eval_pairs=0,
                      per_device_train_batch_size=per_device, n_user_tokens=2, save_strategy="no",
                      logging_steps=1, train_sampling_strategy="sequential", ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
                      seed=0, **extra)
    trainer = PDPOTrainer(args=args, train_dataset=two_user_records(n_prompts=8))
    if sgd:
        trainer.add_callback(FirstGradients(trainer, out + ".grads.safetensors"))
    trainer.train()
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h]
        json.dump({"world_size": trainer.args.world_size,
                   "loss": [h["loss"] for h in history],
                   "accuracy": [h["rewards/accuracies"] for h in history]}, open(out, "w"))
    if torch.distributed.is_initialized():  # a clean gloo shutdown (exiting with it alive can abort a process)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
