"""Training-step speed of P-DPO against TRL's vanilla DPOTrainer, on the same batches.

    python benchmarks/step_speed.py --model tiny-llama --json step_speed_tiny.json
    python benchmarks/step_speed.py --model smollm2-135m-instruct --json step_speed_smollm2.json

Systems (``--systems``; the first four are the default):

* ``trl_dpo``: TRL ``DPOTrainer``, vanilla DPO, full fine-tuning, float32 (``bf16=False``: TRL's
  default bf16 autocast is not what prlhf trains in, and is slow on CPUs without bf16 units);
* ``trl_dpo_precompute``: the same with TRL's best setting for speed, ``precompute_ref_log_probs=True``
  and ``ref_model=None`` (its one-off reference pass reported like prlhf's);
* ``pdpo_alpha_0.5`` / ``pdpo_alpha_1``: prlhf P-DPO, individual user model, T_u = 10, defaults
  (one forward per step, shared-prompt packing, LM head at response positions, reference
  log-probs precomputed before training);
* ``pdpo_alpha_0.5_before_response``: the same with the user tokens between the prompt and the
  response: one packed row holds the prompt once and both terms' user tokens and responses;
* ``pdpo_no_user``: prlhf with ``user_model none`` (vanilla DPO, no user tokens, one term): the
  implementation against TRL's with the method taken out;
* ``official_scheme``: prlhf configured like the authors' code (user and generic rows duplicated,
  reference forward every step, no packing, logits at every position), alpha = 0.5;
* one optimization off at a time, alpha = 0.5: ``pdpo_no_packing``, ``pdpo_full_logits``,
  ``pdpo_step_reference`` (reference forward every step, with a copy of the weights).

Each system lives in its own worker process (so its peak resident memory is its own); the main
process alternates them step by step (rotating the order each round) over the same batches of
TL;DR-shaped pairs (prompts of about ``--prompt-tokens``, responses of about
``--response-tokens``; from ../shared/data/tldr when present, else synthetic text), after
``--warmup`` rounds. The time of a step is forward, backward and optimizer step; P-DPO's
reference pass happens before training and is reported separately
(``reference_seconds_per_comparison``: once per data set, not per epoch). A table is printed and
the JSON written to ``--json``::

    {"seconds_per_comparison": {name: float}, "peak_rss_mb": {name: float},
     "tokens": {"prompt": float, "response": float}, ...}

``--generation`` (default on) also measures batched multi-user generation with the KV cache
against one prompt at a time: tokens per second.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text

DEFAULT_SYSTEMS = ["trl_dpo", "trl_dpo_precompute", "pdpo_no_user", "pdpo_alpha_0.5", "pdpo_alpha_0.5_before_response",
                   "pdpo_alpha_1", "official_scheme"]
OFFICIAL = dict(packing=False, precompute_ref_log_probs=False, response_logits_only=False)
SYSTEMS = {
    "trl_dpo": None,
    "trl_dpo_precompute": None,
    "pdpo_no_user": dict(alpha=0.5, user_model="none"),
    "pdpo_alpha_0.5": dict(alpha=0.5),
    "pdpo_alpha_1": dict(alpha=1.0),
    "pdpo_alpha_0.5_before_response": dict(alpha=0.5, user_position="before_response"),
    "official_scheme": dict(alpha=0.5, **OFFICIAL),
    "pdpo_no_packing": dict(alpha=0.5, packing=False),
    "pdpo_full_logits": dict(alpha=0.5, response_logits_only=False),
    "pdpo_step_reference": dict(alpha=0.5, precompute_ref_log_probs=False),
    # LoRA: reference log-probs from the base (adapters off), precomputed for every pair or at each pair's first visit
    "pdpo_lora": dict(alpha=0.5, use_lora=True),
    "pdpo_lora_lazy_reference": dict(alpha=0.5, use_lora=True, lazy_reference=True),
    # SFT on prompt -> chosen (one sequence per comparison): the LM head at response positions only, or everywhere
    "sft": dict(response_logits_only=True),
    "sft_full_logits": dict(response_logits_only=False),
}
SHARED_TLDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr" / "comparisons_batch13.jsonl"
WORDS = ("the a my we they she he it and but so because when after before about really just very time day week "
         "friend family work school money house car dog cat talk said told asked think feel want need know help "
         "month year boyfriend girlfriend parents job boss apartment city move problem idea plan advice").split()


# -- data -----------------------------------------------------------------------------------------


def tldr_records(path: Path) -> list[dict]:
    from prlhf.data import read_records
    from prlhf.sources.tldr import tldr_prompt

    out = []
    for row in read_records(path):
        texts = [s["text"].strip() for s in row["summaries"]]
        c = int(row["choice"])
        if texts[0] == texts[1]:
            continue
        out.append({"user_id": str(row.get("worker")), "prompt": tldr_prompt(row["info"]),
                    "chosen": " " + texts[c], "rejected": " " + texts[1 - c]})
    return out


def synthetic_records(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int) -> list[dict]:
    """TL;DR-shaped pairs of random words, grown to the requested token counts."""
    rng = random.Random(seed)

    def grow(prefix: str, target: int, suffix: str = "") -> str:
        words = []
        while len(tokenizer(prefix + " ".join(words) + suffix, add_special_tokens=False)["input_ids"]) < target:
            words += rng.choices(WORDS, k=max(1, (target - len(words)) // 4))
        return prefix + " ".join(words) + suffix

    out = []
    for i in range(n):
        prompt = grow("SUBREDDIT: r/advice\nTITLE: a question\nPOST: ", prompt_tokens, "\nTL;DR:")
        short, long = rng.randint(response_tokens * 3 // 4, response_tokens), rng.randint(response_tokens, response_tokens * 5 // 4)
        pair = [grow(" ", short), grow(" ", long)]
        rng.shuffle(pair)
        out.append({"user_id": f"user_{i % 10}", "prompt": prompt, "chosen": pair[0], "rejected": pair[1]})
    return out


def benchmark_records(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int,
                      data: str = "auto") -> tuple[list[dict], str]:
    """``n`` pairs whose prompts are closest to ``prompt_tokens`` tokens and responses at most
    twice ``response_tokens``: real TL;DR comparisons when ../shared is present (``data`` auto or
    tldr), else random words grown to those sizes."""
    if data == "tldr" and not SHARED_TLDR.is_file():
        raise SystemExit(f"{SHARED_TLDR}: not found (use --data synthetic)")
    if data == "synthetic" or not SHARED_TLDR.is_file():
        return synthetic_records(tokenizer, n, prompt_tokens, response_tokens, seed), "synthetic"
    pool, source = tldr_records(SHARED_TLDR), f"TL;DR ({SHARED_TLDR.name})"

    def ntok(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    scored = []
    for r in pool:
        c, rj = ntok(r["chosen"]), ntok(r["rejected"])
        if c > 2 * response_tokens or rj > 2 * response_tokens:
            continue
        scored.append((abs(ntok(r["prompt"]) - prompt_tokens) + abs((c + rj) / 2 - response_tokens), r))
    scored.sort(key=lambda t: t[0])
    picked = [r for _, r in scored[:n]]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} usable pairs in {source}, {n} needed")
    random.Random(seed).shuffle(picked)
    return picked, source


# -- one system per worker process ------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _build(name: str, model_name: str, records: list[dict], batch_size: int, max_length: int, workdir: str):
    """(trainer, batches(indices) -> batch, reference seconds per comparison)."""
    from prlhf.base_models import load_model_and_tokenizer

    # gradient checkpointing pinned off in every system (a recomputation trade, not a method difference)
    common = dict(per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=1e-6,
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, max_length=max_length,
                  gradient_checkpointing=False)
    if name in ("trl_dpo", "trl_dpo_precompute"):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        llm, tok = load_model_and_tokenizer(model_name)
        precompute = name == "trl_dpo_precompute"
        args = DPOConfig(output_dir=os.path.join(workdir, name), beta=0.1, bf16=False, precompute_ref_log_probs=precompute,
                         **common)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records])
        # TRL's best setting: reference log-probs computed once in __init__, no reference copy kept
        spent = []
        real = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **k):
            start = time.perf_counter()
            out = real(self, *a, **k)
            spent.append(time.perf_counter() - start)
            return out

        DPOTrainer._precompute_ref_logps = timed
        try:
            trainer = DPOTrainer(model=llm, ref_model=None if precompute else copy.deepcopy(llm), args=args,
                                 train_dataset=data, processing_class=tok)
        finally:
            DPOTrainer._precompute_ref_logps = real
        ref_seconds = sum(spent) / len(records) if precompute else None
        return trainer, (lambda idx: trainer.data_collator([trainer.train_dataset[i] for i in idx])), ref_seconds

    if name.startswith("sft"):
        from prlhf.config import PSFTConfig
        from prlhf.trainers.sft import PSFTTrainer

        args = PSFTConfig(output_dir=os.path.join(workdir, name), model_name_or_path=model_name, max_prompt_length=None,
                          **common, **SYSTEMS[name])
        trainer = PSFTTrainer(args=args, train_dataset=records)
        examples = trainer.train_dataset
        assert len(examples) == len(records), "truncation dropped pairs: raise --max-length"
        return trainer, (lambda idx: trainer.data_collator([examples[i] for i in idx])), None

    from prlhf.config import PDPOConfig
    from prlhf.trainers.pdpo import PDPOTrainer

    args = PDPOConfig(output_dir=os.path.join(workdir, name), model_name_or_path=model_name, beta=0.1,
                      max_prompt_length=None, reference_cache_dir="none",
                      **common, **{"user_model": "individual", "n_user_tokens": 10, **SYSTEMS[name]})
    trainer = PDPOTrainer(args=args, train_dataset=records)  # the reference pass runs here (no cache: timed)
    examples = trainer.train_dataset
    assert len(examples) == len(records), "truncation dropped pairs: raise --max-length"
    ref_seconds = trainer.reference_seconds / len(examples) if args.precompute_ref_log_probs and not args.lazy_reference else None
    return trainer, (lambda idx: trainer.data_collator([examples[i] for i in idx])), ref_seconds


def _import_for(name: str) -> None:
    """The modules a system's build needs: imported by every worker at once, before the builds (which run
    one after another), so that start-up overlaps while the loading peaks do not."""
    import importlib

    modules = ["prlhf.base_models", "prlhf.config"]
    if name in ("trl_dpo", "trl_dpo_precompute"):
        modules += ["datasets", "trl"]
    else:
        modules.append("prlhf.trainers.sft" if name.startswith("sft") else "prlhf.trainers.pdpo")
    for module in modules:
        importlib.import_module(module)


def worker(name: str, model_name: str, records: list[dict], batch_size: int, max_length: int, workdir: str, conn) -> None:
    import torch

    torch.manual_seed(0)
    try:
        _import_for(name)
        conn.send(("imported", None))
        if conn.recv()[0] != "build":
            return
        trainer, make_batch, ref_seconds = _build(name, model_name, records, batch_size, max_length, workdir)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its steps
        model = trainer.model
        model.train()
        conn.send(("ready", {"reference_seconds_per_comparison": ref_seconds, "rss_after_build_mb": _peak_rss_mb()}))
        while True:
            try:
                msg, payload = conn.recv()
            except EOFError:  # the main process went away
                return
            if msg == "stop":
                conn.send(("done", {"peak_rss_mb": _peak_rss_mb()}))
                return
            batch = make_batch(payload)
            start = time.perf_counter()
            loss = trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            conn.send(("step", {"seconds": time.perf_counter() - start, "loss": float(loss)}))
    except Exception as err:  # noqa: BLE001 - reported to the main process
        import traceback

        try:
            conn.send(("error", f"{name}: {err!r}\n{traceback.format_exc()}"))
        except OSError:
            pass


# -- generation ---------------------------------------------------------------------------------------


def generation_speed(model_name: str, records: list[dict], n: int, new_tokens: int) -> dict:
    """Batched multi-user generation (one ``generate`` call, KV cache) vs one prompt at a time."""
    import torch

    from prlhf.config import PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    users = sorted({r["user_id"] for r in records})
    model = PersonalizedLM.build(PersonalizationConfig(model_name, user_model="individual", n_user_tokens=10),
                                 UserRegistry(users))
    model.eval()
    prompts = [r["prompt"] for r in records[:n]]
    ids = [r["user_id"] for r in records[:n]]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(prompts[:2], ids[:2], max_new_tokens=2)  # warm-up
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(prompts, ids, **kw)
        batched = time.perf_counter() - start
        start = time.perf_counter()
        for p, u in zip(prompts, ids):
            model.generate([p], [u], **kw)
        sequential = time.perf_counter() - start
    total = n * new_tokens
    return {"prompts": n, "users": len(set(ids)), "new_tokens_each": new_tokens,
            "batched_tokens_per_second": total / batched, "sequential_tokens_per_second": total / sequential,
            "batched_seconds": batched, "sequential_seconds": sequential}


def shared_prompt_speed(model_name: str, records: list[dict], n_users: int, new_tokens: int, n_prompts: int = 2) -> dict:
    """One prompt for many users (``user_position: before_response``): each prompt's KV cache computed
    once and shared by its users' rows, against the plain batch that runs the prompt in every row."""
    import torch

    from prlhf.config import PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    users = [f"user_{i}" for i in range(n_users)]
    model = PersonalizedLM.build(PersonalizationConfig(model_name, user_model="individual", n_user_tokens=10,
                                                       user_position="before_response", user_offset_init="vocab"),
                                 UserRegistry(users))
    model.eval()
    prompts = [r["prompt"] for r in records[:n_prompts]]
    rows = [(p, u) for p in prompts for u in users]
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    out, seconds = {}, {}
    with torch.no_grad():
        model.generate(prompts[:1] * 2, users[:2], max_new_tokens=2)  # warm-up
        for mode, share in (("plain", False), ("shared", True)):
            start = time.perf_counter()
            out[mode] = model.generate([p for p, _ in rows], [u for _, u in rows], share_prompt_cache=share, **kw)
            seconds[mode] = time.perf_counter() - start
    total = len(rows) * new_tokens
    return {"prompts": len(prompts), "users_per_prompt": n_users, "new_tokens_each": new_tokens,
            "plain_seconds": seconds["plain"], "shared_seconds": seconds["shared"],
            "plain_tokens_per_second": total / seconds["plain"], "shared_tokens_per_second": total / seconds["shared"],
            "same_text": out["plain"] == out["shared"]}


# -- main ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="tiny-llama | smollm2-135m-instruct | a model folder")
    p.add_argument("--json", required=True, help="where the results go")
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    p.add_argument("--batch-size", type=int, default=2, help="comparisons per step")
    p.add_argument("--steps", type=int, default=3, help="measured rounds (one step of every system each)")
    p.add_argument("--warmup", type=int, default=1, help="rounds before measuring")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--response-tokens", type=int, default=40)
    p.add_argument("--max-length", type=int, default=512, help="per sequence; large enough that nothing is cut")
    p.add_argument("--data", choices=["auto", "tldr", "synthetic"], default="auto",
                   help="auto: ../shared/data/tldr when present, else synthetic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generation", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--generation-prompts", type=int, default=8)
    p.add_argument("--generation-tokens", type=int, default=32)
    p.add_argument("--shared-prompt-users", type=int, default=8,
                   help="users per prompt in the shared-prompt generation measurement (0: skip it)")
    a = p.parse_args(argv)

    from prlhf.base_models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer(a.model)
    rounds = a.warmup + a.steps
    records, source = benchmark_records(tok, a.batch_size * rounds, a.prompt_tokens, a.response_tokens, a.seed, a.data)
    for i, r in enumerate(records):
        r["pair_id"] = i
    prompt_lens = [len(tok(r["prompt"])["input_ids"]) for r in records]
    resp_lens = [len(tok(r[k], add_special_tokens=False)["input_ids"]) for r in records for k in ("chosen", "rejected")]
    schedule = [list(range(s * a.batch_size, (s + 1) * a.batch_size)) for s in range(rounds)]
    print(f"{a.model}: {len(records)} pairs from {source}; prompt {statistics.mean(prompt_lens):.0f} tokens, response "
          f"{statistics.mean(resp_lens):.0f}; batch {a.batch_size}; {a.warmup} warm-up + {a.steps} measured rounds; "
          f"{os.cpu_count()} CPUs", flush=True)

    def fail(info):
        for proc, _ in workers.values():
            proc.kill()
        raise SystemExit(info)

    ctx = mp.get_context("spawn")
    workdir = tempfile.mkdtemp(prefix="prlhf-bench-")
    workers, ready = {}, {}
    for name in a.systems:  # all start (and import) at once ...
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(name, a.model, records, a.batch_size, a.max_length, workdir, child), daemon=True)
        proc.start()
        workers[name] = (proc, parent)
    for name in a.systems:  # ... and build one after another: their loading peaks do not overlap
        conn = workers[name][1]
        for expect in ("imported", "ready"):
            kind, info = conn.recv()
            if kind == "error":
                fail(info)
            if expect == "imported":
                conn.send(("build", None))
        ready[name] = info
        print(f"  {name}: ready", flush=True)
    times = {n: [] for n in a.systems}
    losses = {n: [] for n in a.systems}
    last = {}
    for r, idx in enumerate(schedule):
        order = a.systems[r % len(a.systems):] + a.systems[:r % len(a.systems)]
        for name in order:
            conn = workers[name][1]
            conn.send(("step", idx))
            kind, info = conn.recv()
            if kind == "error":
                fail(info)
            losses[name].append(info["loss"])
            last[name] = info["seconds"]
            if r >= a.warmup:
                times[name].append(info["seconds"])
        print(f"  round {r + 1}/{rounds}" + (" (warm-up)" if r < a.warmup else "") + ": " +
              ", ".join(f"{n} {last[n]:.2f}s" for n in a.systems), flush=True)
    peak = {}
    for name, (proc, conn) in workers.items():
        conn.send(("stop", None))
        peak[name] = float(conn.recv()[1]["peak_rss_mb"])
        proc.join(timeout=60)

    spc = {n: float(statistics.mean(t)) / a.batch_size for n, t in times.items()}
    result = {
        "seconds_per_comparison": spc,
        "peak_rss_mb": peak,
        "tokens": {"prompt": float(statistics.mean(prompt_lens)), "response": float(statistics.mean(resp_lens))},
        "reference_seconds_per_comparison": {n: i["reference_seconds_per_comparison"] for n, i in ready.items()
                                             if i["reference_seconds_per_comparison"] is not None},
        "step_seconds": times,
        "losses": losses,
        "settings": {"model": a.model, "batch_size": a.batch_size, "warmup": a.warmup, "steps": a.steps,
                     "max_length": a.max_length, "data": source, "n_user_tokens": 10, "beta": 0.1, "dtype": "float32",
                     "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                     "python": sys.version.split()[0]},
    }
    ratios = {}
    for base in ("trl_dpo", "trl_dpo_precompute"):
        if base in spc:
            ratios.update({f"{n}/{base}": spc[n] / spc[base] for n in spc if not n.startswith("trl_dpo")})
    if "official_scheme" in spc and "pdpo_alpha_0.5" in spc:
        ratios["official_scheme/pdpo_alpha_0.5"] = spc["official_scheme"] / spc["pdpo_alpha_0.5"]
    result["ratios"] = ratios
    # the headline: every prlhf system against TRL at its best (the faster TRL configuration measured)
    trl = [b for b in ("trl_dpo", "trl_dpo_precompute") if b in spc]
    if trl:
        best = min(trl, key=lambda b: spc[b])
        result["trl_best"] = best
        result["vs_trl_best"] = {n: {"time": spc[n] / spc[best], "memory": peak[n] / peak[best]}
                                 for n in spc if not n.startswith("trl_dpo")}

    if a.generation:
        result["generation"] = generation_speed(a.model, records, a.generation_prompts, a.generation_tokens)
        if a.shared_prompt_users:
            result["generation"]["shared_prompt"] = shared_prompt_speed(a.model, records, a.shared_prompt_users,
                                                                        a.generation_tokens)

    lines = ["| system | s / comparison | vs trl_dpo | vs trl_dpo_precompute | peak RSS (MB) | "
             "reference pass (s / comparison, once) |", "|---|---|---|---|---|---|"]
    for n in a.systems:
        vs = [f"{spc[n] / spc[b]:.2f}" if b in spc else "-" for b in ("trl_dpo", "trl_dpo_precompute")]
        ref = result["reference_seconds_per_comparison"].get(n)
        lines.append(f"| {n} | {spc[n]:.3f} | {vs[0]} | {vs[1]} | {peak[n]:.0f} | {f'{ref:.3f}' if ref is not None else '-'} |")
    print("\n" + "\n".join(lines))
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    for n, v in result.get("vs_trl_best", {}).items():
        print(f"{n} vs TRL at its best ({result['trl_best']}): time {v['time']:.2f}x, memory {v['memory']:.2f}x")
    if a.generation:
        g = result["generation"]
        print(f"generation ({g['prompts']} prompts, {g['users']} users, {g['new_tokens_each']} new tokens each): batched "
              f"{g['batched_tokens_per_second']:.1f} tokens/s, one at a time {g['sequential_tokens_per_second']:.1f} tokens/s")
        if "shared_prompt" in g:
            sp = g["shared_prompt"]
            print(f"one prompt for {sp['users_per_prompt']} users (before_response, {sp['prompts']} prompts): prompt cache "
                  f"shared {sp['shared_seconds']:.2f}s, plain {sp['plain_seconds']:.2f}s "
                  f"({sp['plain_seconds'] / sp['shared_seconds']:.2f}x), same text: {sp['same_text']}")
    result["table"] = "\n".join(lines)
    atomic_write_text(a.json, json.dumps({**result, "run": benchmark_record()}, indent=1))
    print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    main()
