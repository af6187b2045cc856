"""A fork server for the `prlhf` commands that the shell-recipe tests run.

Each `prlhf ...` line of a recipe is a new Python process that spends seconds importing torch,
transformers and PEFT before one tiny step; a recipe test runs 5-8 of them. Here one server
process imports them once (and runs no torch op, so it holds no thread pool), and a `prlhf` shim,
first on the recipe's PATH, hands its argv, working folder, environment and stdin/stdout/stderr to
the server, which forks a child that runs ``prlhf.cli.main`` exactly as the console script does
and reports its exit status back; the shim exits with it. The recipe, its bash, its files and its
`prlhf` command line are the real ones; only the interpreter start-up is shared.

The shim runs the real command (``python -m prlhf``) instead when the server is not there, or when
the caller's environment differs from the server's in a variable read at import time (HF_*,
TORCH*, OMP_* ...). ``PRLHF_TEST_NO_FORKSERVER=1`` turns the server off for a whole test run.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys

# variables that torch, transformers, tokenizers and the like read when imported
IMPORT_TIME_PREFIXES = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "OPENBLAS_",
                        "TOKENIZERS_", "CUDA_", "ACCELERATE_", "PYTHON", "LD_", "XDG_CACHE_HOME")
PRELOAD = ("prlhf.cli", "prlhf.trainers.pdpo", "prlhf.trainers.prm", "prlhf.compare", "prlhf.sources.tldr",
           "prlhf.sources.dsp", "prlhf.adapt", "prlhf.reward_model")


def import_env(env) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


# -- the shim's side -------------------------------------------------------------------------------


def client(sock_path: str, argv: list[str]) -> None:
    """Run ``prlhf argv`` through the server and exit with its status (or run it here if it cannot)."""
    try:
        with open(sock_path + ".env") as f:
            same_env = json.load(f) == import_env(os.environ)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) if same_env else None
        if conn is not None:
            conn.connect(sock_path)
    except OSError:
        conn = None
    if conn is None:
        os.execv(sys.executable, [sys.executable, "-m", "prlhf", *argv])
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(payload))], [0, 1, 2])
    conn.sendall(payload)
    data = b""
    while len(data) < 4:
        chunk = conn.recv(4 - len(data))
        if not chunk:
            sys.stderr.write("prlhf (test fork server): the command ended without an exit status\n")
            sys.exit(1)
        data += chunk
    sys.exit(struct.unpack("!i", data)[0])


def write_shim(folder: str, sock_path: str) -> str:
    """An executable ``prlhf`` in ``folder`` that runs through the server at ``sock_path``."""
    path = os.path.join(folder, "prlhf")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                f"import forkserver\nforkserver.client({sock_path!r}, sys.argv[1:])\n")
    os.chmod(path, 0o755)
    return path


# -- the server's side -----------------------------------------------------------------------------


def _recv_exactly(conn, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _run_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become the command's process, run it, exit with its status."""
    import atexit
    import traceback

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["prlhf", *request["argv"]]
    rc = 1
    try:
        from prlhf.cli import main

        rc = main(request["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc or 0)


def _supervise(conn, log_path: str) -> None:
    """In a forked supervisor: start the command's process, wait for it, send its exit status (and log
    the command with it, so that a test can tell the server ran it)."""
    msg, fds, _, _ = socket.recv_fds(conn, 8, 3)
    request = json.loads(_recv_exactly(conn, struct.unpack("!Q", msg)[0]))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_command(request, fds)
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    rc = rc if rc >= 0 else 128 - rc
    with open(log_path, "a") as f:
        f.write(json.dumps({"argv": request["argv"], "rc": rc}) + "\n")
    conn.sendall(struct.pack("!i", rc))


def serve(sock_path: str) -> None:
    import importlib

    env = import_env(os.environ)  # as given: importing torch sets some (TORCHINDUCTOR_CACHE_DIR)
    for name in PRELOAD:
        importlib.import_module(name)
    with open(sock_path + ".env", "w") as f:
        json.dump(env, f)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(16)
    print("ready", flush=True)
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)
    while True:
        # stdin is a pipe from the test process: its end (the tests are over, or were killed) ends the server
        readable, _, _ = select.select([srv, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(0, 1):
            return
        if srv not in readable:
            continue
        conn, _ = srv.accept()
        while True:  # reap finished supervisors
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            srv.close()
            try:
                _supervise(conn, sock_path + ".log")
            finally:
                os._exit(0)
        conn.close()


class ForkServer:
    """Started on first use; ``env(base)`` puts the shim first on PATH; ``close()`` stops the server."""

    def __init__(self, folder: str):
        self.folder = folder
        self.sock = os.path.join(folder, "prlhf.sock")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.sock], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"the test fork server did not start (said {line!r})")
        self.shim_dir = os.path.join(folder, "bin")
        os.makedirs(self.shim_dir, exist_ok=True)
        write_shim(self.shim_dir, self.sock)

    def served(self) -> list[dict]:
        """The commands the server ran: argv and exit status, in the order they ended."""
        if not os.path.exists(self.sock + ".log"):
            return []
        with open(self.sock + ".log") as f:
            return [json.loads(line) for line in f]

    def env(self, base: dict) -> dict:
        return {**base, "PATH": f"{self.shim_dir}{os.pathsep}{base.get('PATH', '')}"}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    serve(sys.argv[1])
