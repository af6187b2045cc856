"""The recipe tests' fork server (tests/forkserver.py) runs `prlhf` as the real command would: the
caller's folder, streams and exit status, and the real command where the environment differs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes import prlhf_fork_server


@pytest.fixture(scope="module")
def server():
    srv = prlhf_fork_server()
    if srv is None:
        pytest.skip("PRLHF_TEST_NO_FORKSERVER=1")
    return srv


def run(server, cmd: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    base = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", "-c", cmd], cwd=cwd, env=server.env(base), capture_output=True, text=True, timeout=120)


def test_the_server_runs_the_command_in_the_callers_folder_with_its_streams_and_status(server, tmp_path):
    before = len(server.served())
    bad = run(server, "prlhf train --train_file missing.jsonl --output_dir out", tmp_path)
    assert bad.returncode == 2 and "missing.jsonl: no such file" in bad.stderr  # a relative path, read from cwd
    (tmp_path / "d").mkdir()
    good = run(server, "cd d && echo ignored | prlhf --version; echo rc=$?", tmp_path)
    assert good.stdout.startswith("prlhf ") and "rc=0" in good.stdout
    assert server.served()[before:] == [{"argv": ["train", "--train_file", "missing.jsonl", "--output_dir", "out"], "rc": 2},
                                        {"argv": ["--version"], "rc": 0}]


def test_a_different_import_time_environment_runs_the_real_command(server, tmp_path):
    before = len(server.served())
    out = run(server, "prlhf --version", tmp_path, HF_HUB_OFFLINE="0" if os.environ.get("HF_HUB_OFFLINE") == "1" else "1")
    assert out.returncode == 0 and out.stdout.startswith("prlhf ")
    assert len(server.served()) == before  # not through the server
