"""Run by test_distributed.py: a few P-DPO steps with torch's FSDP2 (``fully_shard``) sharding a tiny
model's parameters over 2 CPU processes (gloo, started by torchrun), or unsharded in one process
on the same global batch (plain python). Writes the loss trajectory (rank 0) to argv[1] and the
trained model folder to argv[1] + ".model".

The trainer supplies the data, the precomputed reference log-probs and the P-DPO loss
(``pair_loss``); the loop is a plain one because accelerate does not run FSDP on CPUs.

``argv[2] == "sgd"``: plain SGD instead of AdamW (the update is proportional to the gradient, so a
wrong gradient scale changes the trajectory). Either way, each parameter's gradient after the first
backward (reduce-scattered, then gathered whole) is written to argv[1] + ".grads.safetensors".
``PRLHF_TEST_SUM_REDUCTION=1`` makes FSDP2 sum the processes' gradients instead of averaging them:
the wrong reduction the gradient test must catch."""

import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import two_user_records

from prlhf.config import PDPOConfig
from prlhf.trainers.pdpo import PDPOTrainer

GLOBAL_BATCH, STEPS = 8, 4

if __name__ == "__main__":
    out = sys.argv[1]
    sgd = len(sys.argv) > 2 and sys.argv[2] == "sgd"
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    launch = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if k in os.environ}
    torch.manual_seed(0)
    args = PDPOConfig(output_dir=out + f".run{rank}", report_to="none", use_cpu=True, disable_tqdm=True, n_user_tokens=2,
                      save_strategy="no", seed=0, reference_cache_dir="none", user_offset_init="vocab", health_eval_pairs=0)
    trainer = PDPOTrainer(args=args, train_dataset=two_user_records(n_prompts=16))  # the same model in every process
    os.environ.update(launch)
    model = trainer.model
    model.train()
    sharded = 0
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        for layer in model.llm.model.layers:  # each decoder layer its own unit, the rest (embeddings, user model) the root's
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = sum(p.to_local().numel() for p in model.parameters())
    full = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if sgd else torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, accuracies = [], []
    for step in range(STEPS):
        idx = list(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))[rank::world]  # this process's share
        batch = trainer.data_collator([trainer.train_dataset[i] for i in idx])
        loss, metrics = trainer.pair_loss(model, batch)
        # FSDP2 reduce-scatters the mean gradient over the processes. PRLHF_TEST_SUM_REDUCTION: the sum instead
        # (each process's gradient times the world size, then averaged: gloo has no PREMUL_SUM for a divide factor of 1)
        (loss * world if os.environ.get("PRLHF_TEST_SUM_REDUCTION") else loss).backward()
        if step == 0:  # every parameter's gradient, gathered whole (a collective: every rank takes part)
            grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone().contiguous()
                     for n, p in model.named_parameters() if p.grad is not None}
            if rank == 0:
                from safetensors.torch import save_file

                save_file(grads, out + ".grads.safetensors")
        opt.step()
        opt.zero_grad()
        stats = torch.tensor([loss.item(), metrics["rewards/accuracies"]])
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        losses.append(stats[0].item())
        accuracies.append(stats[1].item())
    # the whole model gathered from the shards (as accelerate's get_state_dict does), written by rank 0
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(out + ".model", state_dict=state)
    else:
        model.save_pretrained(out + ".model")
    if rank == 0:
        json.dump({"world_size": world, "loss": losses, "accuracy": accuracies, "local_numel": sharded or full,
                   "full_numel": full}, open(out, "w"))
    if world > 1:
        dist.destroy_process_group()
