"""Batched decoding in which every row has its own user, sampling settings, stop strings and
length limit: what a server needs to answer requests that arrive together in one model call.

``generate_rows`` embeds each row's prompt behind its own user embedding (``prepare_prompts``:
left padding, the layout of ``PersonalizedLM.generate``), runs the prompt once and then one token
per step with the KV cache. Per row: greedy (temperature 0) or temperature / top-p sampling from
its own seeded generator, EOS and stop strings, ``max_tokens``, the log-probabilities of the chosen
token and the top alternatives, a callback for streamed text, and cancellation. Finished rows leave
the batch (their cache rows are dropped), so a cancelled request stops costing compute at once.
Greedy rows give the tokens of ``PersonalizedLM.generate(..., do_sample=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .scoring import cache_kwarg


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probs; k >= 0: the chosen token's plus the top k


@dataclass
class Completion:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    # per generated token: {"id", "token", "logprob", "top": [{"id", "token", "logprob"}, ...]}
    logprobs: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0


class _Row:
    def __init__(self, params: SamplingParams, device, on_text, is_cancelled):
        self.params = params
        self.out = Completion()
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(int(params.seed))
            else:
                self.generator.seed()
        self.on_text = on_text
        self.is_cancelled = is_cancelled
        self.sent = 0  # characters of text already passed to on_text


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    cum = sorted_p.cumsum(-1)
    drop = cum - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p (at least one token)
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_p)


def _choose(logits: torch.Tensor, row: _Row) -> int:
    p = row.params
    if p.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    probs = _top_p_filter(probs, p.top_p)
    return int(torch.multinomial(probs, 1, generator=row.generator))


def _release(row: _Row, text: str, final: bool) -> None:
    """Pass new text to the row's callback, holding back what could still become a stop string
    or an incomplete character."""
    if row.on_text is None:
        return
    if final:
        upto = len(text)
    else:
        hold = max((len(s) - 1 for s in row.params.stop), default=0)
        upto = len(text) - hold
        while upto > row.sent and text[upto - 1] == "\ufffd":
            upto -= 1
    if upto > row.sent:
        row.on_text(text[row.sent:upto])
        row.sent = upto


@torch.no_grad()
def generate_rows(model, prompts: list, user_ids: list, user_texts: list | None, params: list[SamplingParams],
                  on_text: list[Callable[[str], None] | None] | None = None,
                  is_cancelled: list[Callable[[], bool] | None] | None = None) -> list[Completion]:
    """Generate for every row with its own user and ``SamplingParams``; see the module docstring.
    ``on_text[i]`` receives row i's text as it grows (stop strings never reach it);
    ``is_cancelled[i]()`` True ends row i with finish reason ``cancelled``."""
    n = len(prompts)
    if not (len(user_ids) == len(params) == n):
        raise ValueError("prompts, user_ids and params must have the same length")
    tok = model.tokenizer
    device = model.device
    rows = [_Row(params[i], device, (on_text or [None] * n)[i], (is_cancelled or [None] * n)[i]) for i in range(n)]
    batch = model.prepare_prompts(prompts, user_ids, user_texts)
    mask = batch["attention_mask"]
    for i, row in enumerate(rows):
        row.out.prompt_tokens = int(mask[i].sum()) - model.n_implicit_tokens
    eos = set()
    for e in (tok.eos_token_id, getattr(model.llm.generation_config, "eos_token_id", None)):
        eos.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    was_training = model.training
    model.eval()
    llm = model.llm
    try:
        embeds = model.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])
        position = mask.long().cumsum(-1) - 1
        position = position.masked_fill(mask == 0, 1)
        live = list(range(n))  # rows still in the batch, in batch order
        for row in rows:
            if row.params.max_tokens <= 0:
                row.out.finish_reason = "length"
        keep = [i for i in live if rows[i].out.finish_reason is None]
        if not keep:
            return [r.out for r in rows]
        if len(keep) < n:
            idx = torch.tensor(keep, device=device)
            embeds, mask, position = embeds[idx], mask[idx], position[idx]
            live = keep
        out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        cache_arg = cache_kwarg(llm)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        last_pos = position[:, -1:]
        while True:
            logits = out.logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            next_ids = []
            for b, i in enumerate(live):
                row = rows[i]
                if row.is_cancelled is not None and row.is_cancelled():
                    row.out.finish_reason = "cancelled"
                    next_ids.append(pad)
                    continue
                t = _choose(logits[b], row)
                next_ids.append(t)
                if t in eos:
                    row.out.finish_reason = "stop"
                    _release(row, row.out.text, final=True)
                    continue
                row.out.token_ids.append(t)
                if row.params.logprobs is not None:
                    entry = {"id": t, "token": tok.decode([t]), "logprob": float(logp[b, t]), "top": []}
                    if row.params.logprobs > 0:
                        vals, ids = logp[b].topk(row.params.logprobs)
                        entry["top"] = [{"id": int(j), "token": tok.decode([int(j)]), "logprob": float(v)}
                                        for v, j in zip(vals, ids)]
                    row.out.logprobs.append(entry)
                text = tok.decode(row.out.token_ids, skip_special_tokens=True)
                hit = min((text.find(s) for s in row.params.stop if s and s in text), default=-1)
                if hit >= 0:
                    row.out.text = text[:hit]
                    row.out.finish_reason = "stop"
                    _release(row, row.out.text, final=True)
                    continue
                row.out.text = text
                if len(row.out.token_ids) >= row.params.max_tokens:
                    row.out.finish_reason = "length"
                    _release(row, text, final=True)
                    continue
                _release(row, text, final=False)
            still = [b for b, i in enumerate(live) if rows[i].out.finish_reason is None]
            if not still:
                break
            ids = torch.tensor(next_ids, device=device).unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last_pos = last_pos + 1
            if len(still) < len(live):  # finished rows leave the batch
                sel = torch.tensor(still, device=device)
                ids, mask, last_pos = ids[sel], mask[sel], last_pos[sel]
                cache.batch_select_indices(sel)
                live = [live[b] for b in still]
            out = llm(input_ids=ids, attention_mask=mask, position_ids=last_pos, use_cache=True, **{cache_arg: cache})
    finally:
        model.train(was_training)
    return [r.out for r in rows]
