"""Load test of ``prlhf serve`` on the loopback interface: concurrent clients against one at a time.

    python benchmarks/serve_load.py --model tiny-llama --json serve_load_tiny.json
    python benchmarks/serve_load.py --model outputs/smollm2_tldr/pdpo_individual --requests 48 --max-tokens 32 \\
        --json serve_load_smollm2.json

Starts ``prlhf serve`` as a subprocess on 127.0.0.1 (``--model tiny-llama`` first saves a tiny
random personalized model with ``--users`` users), then sends the same ``--requests`` completions
(prompts of a few words, users mixed: every user of the model plus unknown ones, sampled with a
seed per request, ``--max-tokens`` each) twice: one at a time, then from ``--clients`` concurrent
clients. Bounded: every request has a timeout and the whole run ``--timeout`` seconds. Prints a
table and writes JSON::

    {"sequential": {...}, "concurrent": {...}, "speedup": float}, each phase with
    {"requests", "errors", "seconds", "requests_per_second", "tokens_per_second", "latency_p50", "latency_p95"}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(folder: Path, n_users: int) -> Path:
    import torch

    from prlhf.base_models import tiny_llama
    from prlhf.config import PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    llm, tok = tiny_llama()
    model = PersonalizedLM.build(PersonalizationConfig("tiny-llama", user_model="individual", n_user_tokens=4,
                                                       user_offset_init="vocab"),
                                 UserRegistry([f"user_{i}" for i in range(n_users)]), llm=llm, tokenizer=tok)
    with torch.no_grad():
        model.user_model.offsets.mul_(3.0)
    model.save_pretrained(folder)
    return folder


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_phase(url: str, requests: list[dict], clients: int, request_timeout: float, deadline: float) -> dict:
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    next_i = [0]

    def worker():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(requests) or time.time() > deadline:
                return
            t = time.perf_counter()
            try:
                r = post(url, requests[i], request_timeout)
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens.append(r["usage"]["completion_tokens"])
            except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, ValueError) as err:
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    done = len(latencies)
    return {"clients": clients, "requests": done, "errors": len(errors), "error_examples": errors[:3],
            "not_sent": len(requests) - done - len(errors), "seconds": seconds,
            "requests_per_second": done / seconds, "tokens_per_second": sum(tokens) / seconds,
            "latency_p50": percentile(latencies, 0.5), "latency_p95": percentile(latencies, 0.95),
            "mean_completion_tokens": statistics.fmean(tokens) if tokens else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama", help="a saved model folder, or tiny-llama (a random tiny one)")
    p.add_argument("--users", type=int, default=8, help="users of the tiny model")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run (seconds)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    deadline = time.time() + a.timeout
    with tempfile.TemporaryDirectory(prefix="prlhf-serve-load-") as tmp:
        model_dir = tiny_model(Path(tmp) / "tiny", a.users) if a.model == "tiny-llama" else Path(a.model)
        users = json.loads((model_dir / "users.json").read_text())["users"]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "prlhf.cli", "serve", "--model", str(model_dir), "--host",
                                   "127.0.0.1", "--port", str(port), "--served-model-name", "m",
                                   "--max-batch-size", str(a.max_batch_size)], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if server.poll() is not None or time.time() > deadline:
                        log.flush()
                        raise SystemExit("the server did not start:\n" + (Path(tmp) / "server.log").read_text()[-2000:])
                    time.sleep(0.2)
            mix = users + ["someone_new", None]
            words = "river mountain forest ocean city garden library market castle island".split()
            reqs = []
            for i in range(a.requests):
                body = {"model": "m", "prompt": f"Q: tell me about the {words[i % len(words)]} {i}\nA:",
                        "max_tokens": a.max_tokens, "temperature": 0.8, "seed": i}
                if mix[i % len(mix)] is not None:
                    body["user"] = mix[i % len(mix)]
                reqs.append(body)
            post(url + "/v1/completions", reqs[0], a.request_timeout)  # warm-up
            sequential = run_phase(url + "/v1/completions", reqs, 1, a.request_timeout, deadline)
            concurrent = run_phase(url + "/v1/completions", reqs, a.clients, a.request_timeout, deadline)
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
    result = {"model": a.model, "max_tokens": a.max_tokens, "users": len(users), "sequential": sequential,
              "concurrent": concurrent,
              "speedup": concurrent["requests_per_second"] / sequential["requests_per_second"],
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}}
    print("| clients | requests | errors | req/s | generated tok/s | p50 latency (s) | p95 latency (s) |")
    print("|---|---|---|---|---|---|---|")
    for ph in (sequential, concurrent):
        print(f"| {ph['clients']} | {ph['requests']} | {ph['errors']} | {ph['requests_per_second']:.2f} | "
              f"{ph['tokens_per_second']:.1f} | {ph['latency_p50']:.3f} | {ph['latency_p95']:.3f} |")
    print(f"\nthroughput with {a.clients} clients: {result['speedup']:.2f}x one at a time")
    if a.json:
        atomic_write_text(a.json, json.dumps({**result, "run": benchmark_record()}, indent=1))
        print(f"wrote {a.json}")
    return 0 if sequential["errors"] == 0 and concurrent["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
