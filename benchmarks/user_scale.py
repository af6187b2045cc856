"""Training-step time and peak memory against the number of users a model holds.

    python benchmarks/user_scale.py --json user_scale.json

P-DPO steps on a tiny Llama (2 layers) whose width is SmolLM2-135M's (``--hidden-size 576``), so
that the per-user table is the size it would be on the real model (T_u = ``--user-tokens``, 4: 2,304
floats per user). The model holds 10 / 1,000 / 100,000 users (individual) and 10 / 1,000 / 100,000
/ 1,000,000 (cluster, K = 10); each step trains on ``--batch-size`` pairs of as many different
users, the same pairs at every size. A step is forward, backward, gradient clipping and the
optimizer step, as ``transformers.Trainer`` runs it, with the default ``user_rows_update: auto``
(lazy rows from 1,000 users: sparse gradients and Adam updates for the batch's rows only); with
``--dense`` the same sizes are also measured with the whole table under AdamW (the behaviour
before). Every size runs in its own process (its peak resident memory is its own), one at a time.
Prints a table and writes JSON::

    {"step_seconds": {"individual": {"10": s, "1000": s, "100000": s}, "cluster": {..., "1000000": s}},
     "peak_rss_mb": {same shape}, "dense": {"step_seconds": ..., "peak_rss_mb": ...}, "settings": {...}}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text

SIZES = {"individual": [10, 1_000, 100_000], "cluster": [10, 1_000, 100_000, 1_000_000]}


def worker(kind: str, n_users: int, mode: str, a: dict, conn) -> None:
    try:
        import torch

        from prlhf.base_models import tiny_llama
        from prlhf.config import PDPOConfig, PersonalizationConfig
        from prlhf.modeling import PersonalizedLM
        from prlhf.sources.synthetic import synthesize
        from prlhf.trainers.pdpo import PDPOTrainer
        from prlhf.users import UserRegistry

        torch.manual_seed(0)
        torch.set_num_threads(a["threads"])
        rounds = a["warmup"] + a["steps"]
        conv = synthesize(n_users=a["batch_size"], unseen_users=0, n_prompts=4 * rounds, pairs_per_user=rounds,
                          test_fraction=0.0, seed=0)
        # the batch's users are spread over the table: the first, the last and rows in between
        spread = [round(i * (n_users - 1) / max(1, a["batch_size"] - 1)) for i in range(a["batch_size"])]
        rename = {u: f"user_{spread[i]}" for i, u in enumerate(sorted(conv.users))}
        records = [dict(r, user_id=rename[r["user_id"]]) for r in conv.train]
        llm, tok = tiny_llama(hidden_size=a["hidden_size"])
        cfg = PersonalizationConfig("tiny-llama", user_model=kind, n_user_tokens=a["user_tokens"], n_clusters=10)
        model = PersonalizedLM.build(cfg, UserRegistry(f"user_{i}" for i in range(n_users)), llm=llm, tokenizer=tok)
        args = PDPOConfig(output_dir=tempfile.mkdtemp(prefix="prlhf-user-scale-"), model_name_or_path="tiny-llama",
                          user_model=kind, n_user_tokens=a["user_tokens"], n_clusters=10, user_rows_update=mode,
                          per_device_train_batch_size=a["batch_size"], learning_rate=1e-4, user_learning_rate=1e-2,
                          report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                          train_sampling_strategy="sequential", reference_cache_dir="none", max_length=128)
        trainer = PDPOTrainer(model=model, args=args, train_dataset=records)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        model.train()
        by_user: dict = {}
        for ex in trainer.train_dataset:
            by_user.setdefault(ex["user_id"], []).append(ex)
        times = []
        for r in range(rounds):  # one pair of every user per step
            batch = trainer._prepare_inputs(trainer.data_collator([exs[r % len(exs)] for exs in by_user.values()]))
            assert len(set(batch["user_rows"].tolist())) == a["batch_size"]
            start = time.perf_counter()
            trainer.training_step(model, batch)
            trainer._clip_grad_norm(model)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if r >= a["warmup"]:
                times.append(time.perf_counter() - start)
        conn.send(("ok", {"step_seconds": statistics.median(times),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "optimizer": type(trainer.optimizer).__name__}))
    except Exception as err:  # noqa: BLE001 - reported to the main process
        import traceback

        conn.send(("error", f"{kind} {n_users} {mode}: {err!r}\n{traceback.format_exc()}"))


def measure(kind: str, n: int, mode: str, a: dict) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(kind, n, mode, a, child), daemon=True)
    proc.start()
    status, info = parent.recv()
    proc.join(timeout=60)
    if status != "ok":
        raise SystemExit(info)
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--hidden-size", type=int, default=576, help="the model's width (576: SmolLM2-135M)")
    p.add_argument("--user-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step, each of another user")
    p.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: as the issue's measurement)")
    p.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure user_rows_update dense (AdamW over the whole table)")
    p.add_argument("--sizes", type=json.loads, default=SIZES, help='JSON, e.g. {"individual": [10, 1000]}')
    a = p.parse_args(argv)
    settings = {k: getattr(a, k) for k in ("hidden_size", "user_tokens", "batch_size", "steps", "warmup", "threads")}
    modes = ["auto"] + (["dense"] if a.dense else [])
    out = {mode: {"step_seconds": {}, "peak_rss_mb": {}, "optimizer": {}} for mode in modes}
    for kind, sizes in a.sizes.items():
        for n in sizes:
            for mode in modes:
                info = measure(kind, n, mode, settings)
                for key in ("step_seconds", "peak_rss_mb", "optimizer"):
                    out[mode][key].setdefault(kind, {})[str(n)] = info[key]
                print(f"{kind:10s} {n:>9,d} users, {mode:5s}: {info['step_seconds'] * 1000:8.1f} ms per step, peak RSS "
                      f"{info['peak_rss_mb']:7.0f} MB ({info['optimizer']})", flush=True)
    result = {"step_seconds": out["auto"]["step_seconds"], "peak_rss_mb": out["auto"]["peak_rss_mb"],
              "optimizer": out["auto"]["optimizer"], "settings": {**settings, "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0]}}
    if a.dense:
        result["dense"] = out["dense"]
    lines = ["| user model | users | step (ms), auto | peak RSS (MB), auto | " + ("step (ms), dense | peak RSS (MB), dense |"
             if a.dense else ""), "|---|---|---|---|" + ("---|---|" if a.dense else "")]
    for kind, sizes in a.sizes.items():
        for n in sizes:
            k = str(n)
            row = (f"| {kind} | {n:,d} | {result['step_seconds'][kind][k] * 1000:.1f} | "
                   f"{result['peak_rss_mb'][kind][k]:.0f} |")
            if a.dense:
                row += f" {out['dense']['step_seconds'][kind][k] * 1000:.1f} | {out['dense']['peak_rss_mb'][kind][k]:.0f} |"
            lines.append(row)
        first, last = str(sizes[0]), str(sizes[-1])
        ratio = result["step_seconds"][kind][last] / result["step_seconds"][kind][first]
        result.setdefault("ratio_largest_to_smallest", {})[kind] = ratio
    result["table"] = "\n".join(lines)
    print("\n" + result["table"])
    for kind, r in result["ratio_largest_to_smallest"].items():
        print(f"{kind}: step time at {a.sizes[kind][-1]:,d} users / at {a.sizes[kind][0]:,d}: {r:.2f}x")
    atomic_write_text(a.json, json.dumps({**result, "run": benchmark_record()}, indent=1))
    print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
