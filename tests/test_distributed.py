"""Two CPU processes under `accelerate launch` (gloo) give the loss trajectory of one process with
the same global batch.

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

pytest.importorskip("accelerate")

HERE = Path(__file__).parent


def run(cmd, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_match_one_process(tmp_path):
    script = str(HERE / "distributed_train.py")
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run([sys.executable, script, "8", one], tmp_path)
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517", script, "4", two], tmp_path)
    a, b = json.load(open(one)), json.load(open(two))
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert len(a["loss"]) == len(b["loss"]) == 4
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
    assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
    assert len(set(a["loss"])) > 1  # the trajectory moves
