"""Batched personalized generation of a file of prompts (``prlhf generate --input``): one
``generate()`` call per batch, each row with its own user embedding, the KV cache on; and
best-of-n with a personalized reward model. The sequence layout, the shared prompt cache and
``generate()`` itself are ``PersonalizedLM``'s (``prlhf.modeling``)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from .best_of_n import best_of_n
from .data import read_prompt_records
from .modeling import PersonalizedLM
from .reward_model import PersonalizedRewardModel
from .storage import atomic_write_text, check_output_path

logger = logging.getLogger(__name__)


def count_new_tokens(ids, eos_id: int | None, pad_id: int | None) -> int:
    """Generated tokens of each row up to and including its first EOS (the rest is padding)."""
    total = 0
    for row in ids.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t == eos_id:
                n = i + 1
                break
            if t == pad_id:
                n = i
                break
        total += n
    return total


def generate_records(model, records: list[dict], out: TextIO, batch_size: int = 8,
                     progress: Callable[[int, int], None] | None = None, **generate_kwargs) -> tuple[int, float]:
    """Write each record with its ``response`` (JSON lines) to ``out``; records carry ``prompt``,
    optional ``user_id`` and ``user_text``. Returns (new tokens, seconds)."""
    n_tokens, start = 0, time.perf_counter()
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        batch = model.prepare_prompts([r["prompt"] for r in chunk], [r.get("user_id") for r in chunk],
                                      [r.get("user_text") for r in chunk])
        ids = model.generate_ids(batch, **generate_kwargs)
        n_tokens += count_new_tokens(ids, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id)
        texts = model.tokenizer.batch_decode(ids, skip_special_tokens=True)
        for r, t in zip(chunk, texts):
            out.write(json.dumps({**r, "response": t}, ensure_ascii=False) + "\n")
        if progress is not None:
            progress(min(s + batch_size, len(records)), len(records))
    return n_tokens, time.perf_counter() - start


def run_generate(a) -> None:
    """``prlhf generate`` (a ``GenerateConfig``): one prompt, printed; or a file of prompts, to
    ``a.output`` (JSON lines) or standard output; with ``best_of`` > 1, best-of-n reranked by the
    user's reward (``a.reward_model``)."""
    if a.output:
        check_output_path(a.output, "--output")
    torch.manual_seed(a.seed)
    model = PersonalizedLM.from_pretrained_or_plain(a.model, **a.load_kwargs())
    if a.best_of > 1:
        return _run_best_of(a, model)
    kw = dict(max_new_tokens=a.max_new_tokens, do_sample=a.do_sample, **a.generation_kwargs())
    if a.do_sample:
        kw.update(temperature=a.temperature, top_p=a.top_p)
    if a.prompt is not None:
        print(model.generate([a.prompt], [a.user], [a.user_text], **kw)[0])
        return
    records = read_prompt_records(a.input)
    if a.output:
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    out_f = open(a.output, "w", encoding="utf-8") if a.output else sys.stdout
    try:
        n_tokens, seconds = generate_records(model, records, out_f, a.batch_size,
                                             lambda i, n: logger.info("generated %d/%d", i, n), **kw)
    finally:
        if a.output:
            out_f.close()
    summary = (f"generated {n_tokens} tokens for {len(records)} prompts in {seconds:.1f} s: "
               f"{n_tokens / max(seconds, 1e-9):.1f} tokens/s (batch size {a.batch_size})")
    if a.output:
        print(f"wrote {len(records)} responses to {a.output}; {summary}")
    else:
        logger.warning(summary)


def _run_best_of(a, policy) -> None:
    """``prlhf generate --best-of N --reward-model DIR``: N samples per prompt, the P-RM's pick for the user."""
    rm = PersonalizedRewardModel.from_pretrained(a.reward_model, **a.load_kwargs())
    kw = dict(n=a.best_of, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
              top_p=a.top_p, **a.generation_kwargs())
    if a.prompt is not None:
        best = best_of_n(policy, rm, [a.prompt], [a.user], [a.user_text], **kw)[0]
        print(best["response"])
        logger.info("best of %d: reward %.3f (candidates %s)", a.best_of, best["reward"],
                    ", ".join(f"{c['reward']:.2f}" for c in best["candidates"]))
        return
    records = read_prompt_records(a.input)
    start = time.perf_counter()
    picked = best_of_n(policy, rm, [r["prompt"] for r in records], [r.get("user_id") for r in records],
                       [r.get("user_text") for r in records],
                       progress=lambda i, n: logger.info("best of %d: %d/%d prompts", a.best_of, i, n), **kw)
    lines = "".join(json.dumps({**r, **p}, ensure_ascii=False) + "\n" for r, p in zip(records, picked))
    if a.output:
        atomic_write_text(a.output, lines)
        print(f"wrote {len(records)} best-of-{a.best_of} responses to {a.output} in {time.perf_counter() - start:.1f} s")
    else:
        sys.stdout.write(lines)
