"""Run by test_distributed.py, under `accelerate launch` or plain python: a few P-DPO steps on a
tiny model; writes the logged loss trajectory to argv[2] (main process)."""

import json
import os
import sys

import torch
from conftest import two_user_records

from prlhf.config import PDPOConfig
from prlhf.trainers.pdpo import PDPOTrainer

if __name__ == "__main__":
    per_device, out = int(sys.argv[1]), sys.argv[2]
    args = PDPOConfig(output_dir=out + ".run", report_to="none", use_cpu=True, disable_tqdm=True, max_steps=4, health_eval_pairs=0,
                      per_device_train_batch_size=per_device, learning_rate=1e-3, user_learning_rate=1e-2, n_user_tokens=2, save_strategy="no",
                      logging_steps=1, train_sampling_strategy="sequential", ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, seed=0)
    trainer = PDPOTrainer(args=args, train_dataset=two_user_records(n_prompts=8))
    trainer.train()
    if trainer.is_world_process_zero():
        history = [h for h in trainer.state.log_history if "loss" in h]
        json.dump({"world_size": trainer.args.world_size,
                   "loss": [h["loss"] for h in history],
                   "accuracy": [h["rewards/accuracies"] for h in history]}, open(out, "w"))
    if torch.distributed.is_initialized():  # a clean gloo shutdown (exiting with it alive can abort a process)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
