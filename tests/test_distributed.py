"""Two CPU processes under `accelerate launch` (gloo) give the gradients and the plain-SGD loss
trajectory of one process with the same global batch; so does FSDP2 sharding the model over two
processes, while FSDP asked of accelerate on CPUs (where accelerate would silently train
data-parallel) is a clear error. `pytest tests/test_distributed.py -k grad` runs the gradient checks;
PRLHF_TEST_SUM_REDUCTION=1 in their environment sums the processes' gradients instead of averaging
(they must then fail).

accelerate 1.x runs `--cpu --num_processes 2` as a single process unless an MPI hostfile is
given; on a machine without GPUs, `--multi_gpu --num_processes 2` starts two processes through
torchrun, and accelerate then sets up multi-CPU data parallelism with the gloo backend.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

HERE = Path(__file__).parent


def run(cmd, tmp_path, ok=True):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]


def same_gradients(one: str, two: str) -> int:
    """Every parameter's gradient after the first backward: the two-process run's (after its
    reduction) equals the one-process run's on the same global batch. Returns how many were compared."""
    from safetensors.torch import load_file

    a, b = load_file(one + ".grads.safetensors"), load_file(two + ".grads.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    assert any(float(g.abs().max()) > 1e-4 for g in a.values())  # real gradients, not zeros
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return len(a)


def test_ddp_grad_and_sgd_trajectory_match_one_process(tmp_path):
    """`accelerate launch`, two gloo processes, prlhf's own Trainer: each parameter's gradient after
    the first backward (DDP's all-reduce) equals the one-process gradient on the same global batch,
    and plain SGD without clipping (an update proportional to the gradient) follows the one-process
    loss trajectory. A summed reduction (a doubled gradient) or a loss computed outside the wrapped
    model (no all-reduce: each process keeps half the batch's gradient) fails both."""
    script = str(HERE / "distributed_train.py")
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run([sys.executable, script, "8", one, "sgd"], tmp_path)
    run([*LAUNCH, "--main_process_port", "29517", script, "4", two, "sgd"], tmp_path)
    a, b = json.load(open(one)), json.load(open(two))
    assert a["world_size"] == 1 and b["world_size"] == 2
    same_gradients(one, two)
    assert len(a["loss"]) == len(b["loss"]) == 4
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert len(set(a["loss"])) > 1  # the trajectory moves


def test_fsdp2_grad_and_sgd_trajectory_sharded_over_two_processes_match_one_process(tmp_path):
    """torch's FSDP2 on gloo: each process holds half of the parameters; each parameter's gradient
    after the first backward (reduce-scattered, gathered whole) equals the unsharded one on the same
    global batch, and the P-DPO loss (trainer's pair_loss, packed rows, user model in the root unit)
    under plain SGD follows the unsharded run's trajectory. Checks torch's report of AVG
    reduce-scatter summing on gloo (pytorch issue 162338) on the installed torch."""
    script = str(HERE / "fsdp_train.py")
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run([sys.executable, script, one, "sgd"], tmp_path)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", script,
                two, "sgd"], tmp_path)
    assert "returned a view tensor" not in proc.stderr  # PersonalizedLM's output is a fresh tensor
    a, b = json.load(open(one)), json.load(open(two))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert b["local_numel"] <= 0.51 * b["full_numel"] and a["local_numel"] == a["full_numel"] == b["full_numel"]
    same_gradients(one, two)
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert len(set(a["loss"])) > 1
    # the folder saved from the gathered shards holds the unsharded run's weights
    from prlhf.modeling import PersonalizedLM

    m1, m2 = PersonalizedLM.from_pretrained(one + ".model"), PersonalizedLM.from_pretrained(two + ".model")
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert p1.keys() == p2.keys() and len(p1) > 10
    for name in p1:
        assert torch.allclose(p1[name], p2[name], atol=1e-5), name


def test_fsdp_asked_of_accelerate_on_cpus_is_a_clear_error(tmp_path):
    """accelerate runs multi-CPU jobs data-parallel and ignores an FSDP config; training must say so
    instead of silently keeping a full model copy in every process."""
    launch = [a for a in LAUNCH if a != "--multi_gpu"]
    proc = run([*launch, "--use_fsdp", "--fsdp_version", "2", "--main_process_port", "29521",
                str(HERE / "distributed_train.py"), "4", str(tmp_path / "out.json")], tmp_path, ok=False)
    assert proc.returncode != 0
    assert "FSDP was asked for, but accelerate runs this job as MULTI_CPU" in proc.stderr


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                       ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    """The GPU configs in configs/accelerate (docs/performance.md) are valid accelerate config files."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(HERE.parent / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind and not cfg.use_cpu and cfg.num_processes >= 2
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])


def test_fsdp_auto_wrap_finds_the_decoder_layers():
    """accelerate's transformer auto-wrap reads _no_split_modules: a unit per decoder layer of the LLM."""
    from accelerate.utils.dataclasses import get_module_class_from_name
    from conftest import build_model

    model = build_model()
    assert model._no_split_modules == ["LlamaDecoderLayer"]
    cls = get_module_class_from_name(model, "LlamaDecoderLayer")
    assert cls is not None and sum(isinstance(m, cls) for m in model.modules()) == len(model.llm.model.layers)
