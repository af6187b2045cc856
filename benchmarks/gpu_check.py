"""The GPU check: what prlhf has only ever run on CPUs, run on one GPU in a few minutes (no network).

    python benchmarks/gpu_check.py --json gpu_check.json            # one GPU: bf16, a ~0.7B model, under 8 minutes
    python benchmarks/gpu_check.py --cpu-small --json out.json      # the same checks at small sizes on CPU (the suite)

Each check is recorded as passed or failed (with the error); one failing does not stop the others.

1. ``families``: a tiny random model of each tested family (llama, gpt2, qwen2, gemma2, mistral,
   phi3) on the device: packing and the response-only LM head equal the plain layout with full
   logits (``verify_fast_paths``, float32), and two P-DPO training steps in the check's dtype with a
   finite loss.
2. ``speed``: a random-weight Llama-shaped model (GPU: hidden 1536, 24 layers, about 0.7B
   parameters; CPU: tiny), full fine-tuning in bf16 mixed precision on the same pairs: prlhf P-DPO
   (individual users, T_u 10, alpha 0.5), prlhf P-RM (user tokens after the response) and TRL's
   ``DPOTrainer`` at its best (``precompute_ref_log_probs``, vanilla DPO). Seconds per comparison
   (steps after the first, timed with the device synchronised) and peak device memory.
3. ``shared_prompt_cache``: greedy generation with the user tokens before the response, one prompt
   for several users, is the same with and without the prompt's KV cache shared (float32).
4. ``vllm_handoff``: ``prlhf export-vllm``'s folder loaded with plain transformers and fed
   ``UserPromptEmbedder``'s embeddings gives ``PersonalizedLM.generate``'s greedy tokens for three users.

Writes one JSON (``--json``: ``checks`` {name: {"ok", ...}}, ``speed`` {system: {"seconds_per_comparison",
"peak_memory_gb", ...}}, ``device``, ``run``) and prints a table. Packages beyond the project's own
(torch, transformers, peft, accelerate, safetensors): ``trl`` and ``datasets`` for the TRL row (the row
is marked skipped without them).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prlhf.runs import benchmark_record  # noqa: E402
from prlhf.storage import atomic_write_text  # noqa: E402

GPU_SIZE = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
CPU_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def records(tok, n: int, prompt_tokens: int, response_tokens: int) -> list[dict]:
    from step_speed import synthetic_records

    return synthetic_records(tok, n, prompt_tokens, response_tokens, seed=0)


def step_timer(device):
    """A TrainerCallback that keeps the seconds of each optimizer step (the device synchronised) and
    each logged loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.losses, self._start = [], [], None

        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            self.seconds.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def common_args(out: str, device: torch.device, bf16: bool, batch: int, steps: int, max_length: int) -> dict:
    return dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                use_cpu=device.type == "cpu", bf16=bf16, gradient_checkpointing=False, max_length=max_length)


def peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_result(timer, n_pairs_per_step: int, device, extra: dict | None = None) -> dict:
    steps = timer.seconds[1:] or timer.seconds  # the first step warms kernels and allocator up
    per_step = sum(steps) / len(steps)
    return {"seconds_per_step": per_step, "seconds_per_comparison": per_step / n_pairs_per_step,
            "steps_timed": len(steps), "loss": timer.losses, "finite": all(math.isfinite(x) for x in timer.losses),
            "peak_memory_gb": peak_gb(device), **(extra or {})}


def build_llm(size: dict, tok, device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**size, "vocab_size": max(size.get("vocab_size", 0), len(tok))}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):
        llm = LlamaForCausalLM(cfg)
    return llm


# -- the checks -----------------------------------------------------------------------------------------


def check_families(device, bf16: bool, work: str) -> dict:
    from prlhf.base_models import TINY_FAMILIES, tiny_family, tiny_tokenizer
    from prlhf.config import PDPOConfig, PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.scoring import verify_fast_paths
    from prlhf.trainers.pdpo import PDPOTrainer
    from prlhf.users import UserRegistry

    out = {}
    tok = tiny_tokenizer()
    data = records(tok, 8, 24, 8)
    for name in TINY_FAMILIES:
        try:
            llm = tiny_family(name, tok).to(device)
            cfg = PersonalizationConfig(base_model_name_or_path=name, user_model="individual", n_user_tokens=3)
            model = PersonalizedLM.build(cfg, UserRegistry.from_records(data), llm=llm, tokenizer=tok)
            problem = verify_fast_paths(model, data, packing=True, fast_head=True, atol=1e-4)
            timer = step_timer(device)
            args = PDPOConfig(**common_args(f"{work}/{name}", device, bf16, 4, 2, 128), reference_cache_dir="none",
                              health_eval_pairs=0, n_user_tokens=3)
            PDPOTrainer(model=model, args=args, train_dataset=data, callbacks=[timer]).train()
            ok = problem is None and len(timer.losses) == 2 and all(math.isfinite(x) for x in timer.losses)
            out[name] = {"ok": ok, "fast_paths": problem or "equal", "loss": timer.losses}
        except Exception as err:  # noqa: BLE001 - recorded, the other families go on
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
    return out


def speed(device, bf16: bool, size: dict, batch: int, steps: int, prompt_tokens: int, response_tokens: int,
          work: str) -> dict:
    from prlhf.base_models import tiny_tokenizer
    from prlhf.config import PDPOConfig, PersonalizationConfig, PRMConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.reward_model import PersonalizedRewardModel
    from prlhf.trainers.pdpo import PDPOTrainer
    from prlhf.trainers.prm import PRMTrainer
    from prlhf.users import UserRegistry

    tok = tiny_tokenizer()
    data = records(tok, batch * (steps + 1), prompt_tokens, response_tokens)
    max_length = prompt_tokens + 2 * response_tokens + 32
    registry = UserRegistry.from_records(data)
    out = {}
    n_params = None

    def system(name, run):
        peak_reset(device)
        try:
            out[name] = run()
        except Exception as err:  # noqa: BLE001 - recorded, the other systems go on
            out[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def pdpo():
        nonlocal n_params
        llm = build_llm(size, tok, device)
        n_params = sum(p.numel() for p in llm.parameters())
        cfg = PersonalizationConfig(base_model_name_or_path="random-llama", user_model="individual", n_user_tokens=10)
        model = PersonalizedLM.build(cfg, registry, llm=llm, tokenizer=tok)
        timer = step_timer(device)
        args = PDPOConfig(**common_args(f"{work}/pdpo", device, bf16, batch, steps, max_length), reference_cache_dir="none",
                          health_eval_pairs=0, n_user_tokens=10, alpha=0.5)
        trainer = PDPOTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
        return {"ok": True, **timed_result(timer, batch, device, {"reference_seconds_per_comparison":
                                                                   trainer.reference_seconds / len(data)})}

    def prm():
        llm = build_llm(size, tok, device)
        cfg = PersonalizationConfig(base_model_name_or_path="random-llama", user_model="individual", n_user_tokens=10,
                                    user_position="after_response")
        rm = PersonalizedRewardModel(PersonalizedLM.build(cfg, registry, llm=llm, tokenizer=tok)).to(device)
        timer = step_timer(device)
        args = PRMConfig(**common_args(f"{work}/prm", device, bf16, batch, steps, max_length), health_eval_pairs=0,
                         n_user_tokens=10, user_position="after_response")
        PRMTrainer(model=rm, args=args, train_dataset=data, callbacks=[timer]).train()
        return {"ok": True, **timed_result(timer, batch, device)}

    def trl():
        try:
            from datasets import Dataset
            from trl import DPOConfig, DPOTrainer
        except ImportError as err:
            return {"ok": None, "skipped": f"TRL not installed ({err}): carry trl and datasets to compare"}
        llm = build_llm(size, tok, device)
        timer = step_timer(device)
        args = DPOConfig(**common_args(f"{work}/trl", device, bf16, batch, steps, max_length), beta=0.1,
                         precompute_ref_log_probs=True)
        ds = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in data])
        DPOTrainer(model=llm, ref_model=None, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer]).train()
        return {"ok": True, **timed_result(timer, batch, device)}

    system("pdpo_individual", pdpo)
    system("prm_after_response", prm)
    system("trl_dpo_precompute", trl)
    for v in out.values():
        if v.get("ok") and not v.get("finite", True):
            v["ok"] = False
    return {"model_parameters": n_params, "size": size, "batch_pairs": batch, "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens, "systems": out}


def check_shared_prompt_cache(device) -> dict:
    from prlhf.base_models import tiny_llama
    from prlhf.config import PersonalizationConfig
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    llm, tok = tiny_llama()
    cfg = PersonalizationConfig(base_model_name_or_path="tiny-llama", user_model="individual", n_user_tokens=3,
                                user_position="before_response", user_offset_init="random")
    model = PersonalizedLM.build(cfg, UserRegistry(["a", "b", "c"]), llm=llm, tokenizer=tok).to(device).eval()
    prompts, users = ["Q: the river\nA:"] * 3 + ["Q: a much longer question about the sea\nA:"] * 2, ["a", "b", "c", "a", None]
    shared = model.generate(prompts, users, max_new_tokens=12, do_sample=False, share_prompt_cache=True)
    plain = model.generate(prompts, users, max_new_tokens=12, do_sample=False, share_prompt_cache=False)
    return {"ok": shared == plain, "users_differ": len(set(shared[:3])) > 1}


def check_vllm_handoff(device, work: str) -> dict:
    from transformers import AutoModelForCausalLM

    from prlhf.base_models import tiny_llama
    from prlhf.config import PersonalizationConfig
    from prlhf.export import UserPromptEmbedder, export_for_vllm
    from prlhf.modeling import PersonalizedLM
    from prlhf.users import UserRegistry

    out = {}
    for position in ("prefix", "before_response"):
        llm, tok = tiny_llama()
        cfg = PersonalizationConfig(base_model_name_or_path="tiny-llama", user_model="individual", n_user_tokens=3,
                                    user_position=position, user_offset_init="random", use_lora=True)
        model = PersonalizedLM.build(cfg, UserRegistry(["a", "b"]), llm=llm, tokenizer=tok)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for name, p in model.llm.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(f"{work}/{position}")
        export_for_vllm(f"{work}/{position}", f"{work}/{position}_vllm", device=str(device))
        loaded = PersonalizedLM.from_pretrained(f"{work}/{position}", device=device)
        embedder = UserPromptEmbedder(f"{work}/{position}_vllm", device=device)
        plain = AutoModelForCausalLM.from_pretrained(f"{work}/{position}_vllm/llm").to(device).eval()
        eos = tok.eos_token_id
        same = True
        for prompt, user in (("Q: the river\nA:", "a"), ("Q: hi\nA:", "b"), ("Q: the sea\nA:", None)):
            mine = loaded.generate_ids(loaded.prepare_prompts([prompt], [user]), max_new_tokens=8, do_sample=False)[0].tolist()
            mine = mine[:mine.index(eos) + 1] if eos in mine else mine
            e = embedder(prompt, user)
            with torch.no_grad():
                ids = plain.generate(inputs_embeds=e[None], attention_mask=torch.ones(1, len(e), dtype=torch.long, device=device),
                                     max_new_tokens=8, do_sample=False, pad_token_id=eos)[0].tolist()
            ids = ids[:ids.index(eos) + 1] if eos in ids else ids
            same = same and ids == mine
        out[position] = same
    return {"ok": all(out.values()), **out}


def table(result: dict) -> str:
    lines = ["| check | result |", "|---|---|"]
    for name, c in result["checks"].items():
        if name == "families":
            for fam, v in c.items():
                lines.append(f"| family {fam} | {'ok' if v.get('ok') else 'FAILED: ' + str(v.get('error') or v.get('fast_paths'))} |")
        else:
            lines.append(f"| {name} | {'ok' if c.get('ok') else 'FAILED: ' + str(c.get('error', c))} |")
    sp = result["speed"]
    lines += ["", f"Speed: random Llama-shaped model, {sp.get('model_parameters') or 0:,} parameters, batches of "
              f"{sp['batch_pairs']} pairs ({sp['prompt_tokens']}-token prompts, {sp['response_tokens']}-token responses), "
              f"{result['dtype']} on {result['device']}:", "",
              "| system | s/comparison | peak memory (GB) | loss finite |", "|---|---|---|---|"]
    for name, v in sp["systems"].items():
        if v.get("ok") is None:
            lines.append(f"| {name} | skipped: {v.get('skipped')} | - | - |")
        elif "seconds_per_comparison" in v:
            mem = "-" if v.get("peak_memory_gb") is None else f"{v['peak_memory_gb']:.2f}"
            lines.append(f"| {name} | {v['seconds_per_comparison']:.4f} | {mem} | {v['finite']} |")
        else:
            lines.append(f"| {name} | FAILED: {v.get('error')} | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-small", action="store_true", help="small sizes on the CPU (what the test suite runs)")
    ap.add_argument("--json", default=None, help="where to write the results")
    ap.add_argument("--steps", type=int, default=None, help="training steps per speed system (GPU 12, CPU 3)")
    a = ap.parse_args(argv)
    begin = time.time()
    if a.cpu_small:
        device, bf16 = torch.device("cpu"), False
        size, batch, steps, prompt_tokens, response_tokens = CPU_SIZE, 2, a.steps or 3, 24, 8
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU here: run with --cpu-small for the small CPU version")
        device = torch.device("cuda")
        bf16 = torch.cuda.is_bf16_supported()
        size, batch, steps, prompt_tokens, response_tokens = GPU_SIZE, 8, a.steps or 12, 256, 96
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": "bf16 mixed precision" if bf16 else "float32", "torch": torch.__version__, "checks": {}}
    with tempfile.TemporaryDirectory() as work:
        steps_list = [("families", lambda: check_families(device, bf16, f"{work}/families")),
                      ("shared_prompt_cache", lambda: check_shared_prompt_cache(device)),
                      ("vllm_handoff", lambda: check_vllm_handoff(device, f"{work}/vllm"))]
        for name, fn in steps_list:
            start = time.time()
            try:
                result["checks"][name] = fn()
            except Exception as err:  # noqa: BLE001 - recorded, the other checks go on
                result["checks"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                          "trace": traceback.format_exc()[-2000:]}
            print(f"[{time.time() - begin:.0f} s] {name}: {time.time() - start:.1f} s", flush=True)
        result["speed"] = speed(device, bf16, size, batch, steps, prompt_tokens, response_tokens, f"{work}/speed")
        print(f"[{time.time() - begin:.0f} s] speed", flush=True)
    fam = result["checks"]["families"]
    result["ok"] = (all(v.get("ok") for v in fam.values()) and
                    all(c.get("ok") for n, c in result["checks"].items() if n != "families") and
                    all(v.get("ok") is not False for v in result["speed"]["systems"].values()))
    result["seconds"] = time.time() - begin
    result["table"] = table(result)
    result["run"] = benchmark_record(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])
    print("\n" + result["table"] + f"\n\nall checks passed: {result['ok']} ({result['seconds']:.0f} s)")
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=1, default=str))
        print(f"wrote {a.json}")
    return result


if __name__ == "__main__":
    res = main()
    raise SystemExit(0 if res["ok"] else 1)
