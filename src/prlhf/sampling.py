"""Batched decoding in which every row has its own user, sampling settings, stop strings and
length limit: what a server needs to answer requests that arrive together in one model call.

``generate_rows`` embeds each row's prompt behind its own user embedding (``prepare_prompts``:
left padding, the layout of ``PersonalizedLM.generate``), runs the prompt once and then one token
per step with the KV cache. Per row: greedy (temperature 0) or temperature / top-p sampling from
its own seeded generator, EOS and stop strings, ``max_tokens``, the log-probabilities of the chosen
token and the top alternatives, a callback for streamed text, and cancellation. Finished rows leave
the batch (their cache rows are dropped), so a cancelled request stops costing compute at once.
Greedy rows give the tokens of ``PersonalizedLM.generate(..., do_sample=False)``.

``DecodeBatch`` is the loop itself, one step at a time, so that a server can add rows to a running
batch as others finish (continuous batching: ``prlhf serve``).
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


class CannotJoin(RuntimeError):
    """The model's KV cache cannot take rows mid-way (not a plain ``DynamicCache``)."""


def _join_caches(a, b, pad_a: int, pad_b: int) -> None:
    """Append cache ``b``'s rows to cache ``a`` in place, each left-padded along the sequence by its
    pad (the padded positions are masked out)."""
    from transformers.cache_utils import DynamicLayer

    layers_a, layers_b = getattr(a, "layers", None), getattr(b, "layers", None)
    if layers_a is None or layers_b is None or len(layers_a) != len(layers_b) or \
            any(type(la) is not DynamicLayer or type(lb) is not DynamicLayer for la, lb in zip(layers_a, layers_b)):
        raise CannotJoin("rows can join a running batch only over a plain DynamicCache")
    pad = torch.nn.functional.pad
    for la, lb in zip(layers_a, layers_b):
        la.keys = torch.cat([pad(la.keys, (0, 0, pad_a, 0)), pad(lb.keys, (0, 0, pad_b, 0))], dim=0)
        la.values = torch.cat([pad(la.values, (0, 0, pad_a, 0)), pad(lb.values, (0, 0, pad_b, 0))], dim=0)


def _trim_cache(cache, first: int) -> None:
    """Drop the first ``first`` cached positions (masked out for every row left)."""
    for layer in getattr(cache, "layers", []):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class DecodeBatch:
    """Rows decoding together, one token per ``step()`` over one KV cache, each with its own user,
    sampling settings, stop strings and length. Finished rows leave at once; new rows can join
    between steps (``add``: their prompts prefilled on their own, sharing a prompt's prefill across its
    users where the layout allows, then their cache rows left-padded to the batch's length), which is
    continuous batching. Positions follow each row's own tokens, so a row's tokens do not depend on
    the rows beside it or on when it joined."""

    def __init__(self, model):
        self.model, self.tok, self.device, self.llm = model, model.tokenizer, model.device, model.llm
        self.cache_arg = cache_kwarg(self.llm)
        eos = set()
        for e in (self.tok.eos_token_id, getattr(self.llm.generation_config, "eos_token_id", None)):
            eos.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
        self.eos = eos
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(eos), 0)
        self.rows: list[_Row] = []  # live rows, in batch order
        self.cache = self.mask = self.last_pos = self.logits = None
        self.can_join = True

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, prompts: list, user_ids: list, user_texts: list | None, params: list[SamplingParams],
            on_text: list | None = None, is_cancelled: list | None = None) -> list[_Row]:
        """Prefill new rows and join them to the batch; returns them (in order), those with
        ``max_tokens`` <= 0 already finished."""
        n = len(prompts)
        if not (len(user_ids) == len(params) == n):
            raise ValueError("prompts, user_ids and params must have the same length")
        if self.rows and not self.can_join:
            raise CannotJoin("this batch's cache cannot take rows mid-way")
        rows = [_Row(params[i], self.device, (on_text or [None] * n)[i], (is_cancelled or [None] * n)[i]) for i in range(n)]
        keep = [i for i, r in enumerate(rows) if r.params.max_tokens > 0]
        for r in rows:
            if r.params.max_tokens <= 0:
                r.out.finish_reason = "length"
        sub = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        batch = self.model.prepare_prompts(prompts, user_ids, user_texts, share_prompts=None)
        for i, row in enumerate(rows):
            row.out.prompt_tokens = int(batch["attention_mask"][i].sum()) - self.model.n_implicit_tokens
        if not keep:
            return rows
        if len(keep) < n:
            batch = self.model.prepare_prompts(sub(prompts), sub(user_ids), sub(user_texts), share_prompts=None)
        mask = batch["attention_mask"]
        embeds = self.model.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])
        position = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if "prompt_rows" in batch:  # each distinct prompt run once, its cache rows repeated for its users
            width = batch["prompt_width"]
            cache = self.model.prefill_prompts(batch, embeds)
            out = self.llm(inputs_embeds=embeds[:, width:], attention_mask=mask, position_ids=position[:, width:],
                           use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        else:
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        logits = out.logits[:, -1, :].float()
        joined = [rows[i] for i in keep]
        if not self.rows:
            from transformers.cache_utils import DynamicLayer

            self.cache, self.mask, self.last_pos, self.logits = cache, mask, position[:, -1:], logits
            layers = getattr(cache, "layers", None)  # can later rows join this cache?
            self.can_join = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        else:
            la, lb = self.mask.shape[1], mask.shape[1]
            width = max(la, lb)
            _join_caches(self.cache, cache, width - la, width - lb)
            pad = torch.nn.functional.pad
            self.mask = torch.cat([pad(self.mask, (width - la, 0)), pad(mask, (width - lb, 0))], dim=0)
            self.last_pos = torch.cat([self.last_pos, position[:, -1:]], dim=0)
            self.logits = torch.cat([self.logits, logits], dim=0)
        self.rows += joined
        return rows

    def _finish_token(self, row: _Row, t: int, logp_row: torch.Tensor) -> None:
        """Row ``row`` chose token ``t``: EOS, a stop string, the length limit, or more text."""
        tok = self.tok
        if t in self.eos:
            row.out.finish_reason = "stop"
            _release(row, row.out.text, final=True)
            return
        row.out.token_ids.append(t)
        if row.params.logprobs is not None:
            entry = {"id": t, "token": tok.decode([t]), "logprob": float(logp_row[t]), "top": []}
            if row.params.logprobs > 0:
                vals, ids = logp_row.topk(row.params.logprobs)
                entry["top"] = [{"id": int(j), "token": tok.decode([int(j)]), "logprob": float(v)} for v, j in zip(vals, ids)]
            row.out.logprobs.append(entry)
        text = tok.decode(row.out.token_ids, skip_special_tokens=True)
        hit = min((text.find(s) for s in row.params.stop if s and s in text), default=-1)
        if hit >= 0:
            row.out.text = text[:hit]
            row.out.finish_reason = "stop"
            _release(row, row.out.text, final=True)
            return
        row.out.text = text
        if len(row.out.token_ids) >= row.params.max_tokens:
            row.out.finish_reason = "length"
            _release(row, text, final=True)
            return
        _release(row, text, final=False)

    @torch.no_grad()
    def step(self) -> list[_Row]:
        """Choose one token for every live row, let finished rows leave, and run the rest one
        position further. Returns the rows that finished in this step."""
        if not self.rows:
            return []
        logp = torch.log_softmax(self.logits, dim=-1)
        next_ids = []
        for b, row in enumerate(self.rows):
            if row.is_cancelled is not None and row.is_cancelled():
                row.out.finish_reason = "cancelled"
                next_ids.append(self.pad)
                continue
            t = _choose(self.logits[b], row)
            next_ids.append(t)
            self._finish_token(row, t, logp[b])
        finished = [row for row in self.rows if row.out.finish_reason is not None]
        still = [b for b, row in enumerate(self.rows) if row.out.finish_reason is None]
        if not still:
            self.rows, self.cache, self.mask, self.last_pos, self.logits = [], None, None, None, None
            return finished
        ids = torch.tensor(next_ids, device=self.device).unsqueeze(-1)
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        last_pos = self.last_pos + 1
        if len(still) < len(self.rows):  # finished rows leave the batch
            sel = torch.tensor(still, device=self.device)
            ids, mask, last_pos = ids[sel], mask[sel], last_pos[sel]
            self.cache.batch_select_indices(sel)
            self.rows = [self.rows[b] for b in still]
            # positions masked out for every row left (the departed rows' longer prompts) are dropped
            first = int((mask[:, :-1] != 0).any(0).long().argmax()) if mask.shape[1] > 1 else 0
            if first > 0 and self.can_join:
                _trim_cache(self.cache, first)
                mask = mask[:, first:]
        out = self.llm(input_ids=ids, attention_mask=mask, position_ids=last_pos, use_cache=True,
                       **{self.cache_arg: self.cache})
        self.logits, self.mask, self.last_pos = out.logits[:, -1, :].float(), mask, last_pos
        return finished


def generate_rows(model, prompts: list, user_ids: list, user_texts: list | None, params: list[SamplingParams],
                  on_text: list[Callable[[str], None] | None] | None = None,
                  is_cancelled: list[Callable[[], bool] | None] | None = None) -> list[Completion]:
    """Generate for every row with its own user and ``SamplingParams``; see the module docstring.
    ``on_text[i]`` receives row i's text as it grows (stop strings never reach it);
    ``is_cancelled[i]()`` True ends row i with finish reason ``cancelled``."""
    was_training = model.training
    model.eval()
    try:
        batch = DecodeBatch(model)
        rows = batch.add(prompts, user_ids, user_texts, params, on_text, is_cancelled)
        while len(batch):
            batch.step()
    finally:
        model.train(was_training)
    return [r.out for r in rows]
