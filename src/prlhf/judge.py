"""``prlhf judge``: pairwise LLM-as-judge win rates of method A against method B.

Reads the ``generations.jsonl`` that ``prlhf eval --generate N --report DIR`` writes (one line per
generation: method, user_id, prompt, response, and user_text when the user has one), pairs A's and
B's responses to the same (user, prompt), and asks a judge behind any OpenAI-compatible endpoint
(``/chat/completions``) which is better, with a template (``generic``, ``psoups``, ``prism``, or a
file of your own with the placeholders ``{prompt}``, ``{response_a}``, ``{response_b}``,
``{user_profile}`` (the user's text) and ``{user_id}``).

* Each pair is judged in both orders, so position bias cancels: A wins when both orders prefer it,
  a disagreement is a tie (half a win).
* The verdict is read from the log-probabilities of "A" and "B" as the first token when the
  endpoint returns them (``logprobs``/``top_logprobs``), else parsed from the text; answers that
  give neither are counted as ``invalid`` and reported, never dropped silently.
* Win rates per sample and per user (each user's mean, then the mean over users), ties as half,
  with bootstrap intervals.
* Judgments are cached on disk (one JSON line each, keyed by a hash of template, judge model,
  prompt and the two responses in order), so a rerun or an interrupted run does not pay twice.
* Requests go through the ``openai`` client, with bounded concurrency; the client retries with
  backoff on 408, 409, 429, 5xx and connection errors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from .data import DataError, read_records
from .stats import bootstrap_ci

logger = logging.getLogger(__name__)

TEMPLATES = ("generic", "psoups", "prism")


def load_template(name_or_path: str) -> str:
    """A built-in template by name, else the text of a file."""
    if name_or_path in TEMPLATES:
        return resources.files("prlhf").joinpath("judge_templates", f"{name_or_path}.txt").read_text(encoding="utf-8")
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--template {name_or_path}: neither a built-in template {TEMPLATES} nor a file")
    text = path.read_text(encoding="utf-8")
    for key in ("{prompt}", "{response_a}", "{response_b}"):
        if key not in text:
            raise ValueError(f"{path}: the template has no {key} placeholder")
    return text


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):  # chat messages
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def fill(template: str, prompt, first: str, second: str, profile: str | None, user_id: str | None = None) -> str:
    out = template.replace("{prompt}", _prompt_text(prompt)).replace("{user_profile}", profile or "(not given)")
    out = out.replace("{user_id}", str(user_id) if user_id is not None else "(unknown)")
    return out.replace("{response_a}", first).replace("{response_b}", second)


def read_pairs(path: str | Path, a: str, b: str) -> tuple[list[dict], dict]:
    """(pairs, counts): A's and B's generation for each (user, prompt) both methods answered."""
    by_method: dict[str, dict] = {a: {}, b: {}}
    methods = set()
    for i, rec in enumerate(read_records(path)):
        for key in ("method", "prompt", "response"):
            if key not in rec:
                raise DataError(f"{path}: line {rec.get('_line', i + 1)}: field '{key}' is missing")
        methods.add(rec["method"])
        if rec["method"] in by_method:
            key = (rec.get("user_id"), json.dumps(rec["prompt"], sort_keys=True))
            by_method[rec["method"]].setdefault(key, rec)
    for m in (a, b):
        if not by_method[m]:
            raise DataError(f"{path}: no generations of method {m!r} (the file has {sorted(methods)})")
    keys = [k for k in by_method[a] if k in by_method[b]]
    pairs = [{"user_id": k[0], "prompt": by_method[a][k]["prompt"], "a": by_method[a][k]["response"],
              "b": by_method[b][k]["response"],
              "user_text": by_method[a][k].get("user_text") or by_method[b][k].get("user_text")} for k in keys]
    counts = {"a_only": len(by_method[a]) - len(keys), "b_only": len(by_method[b]) - len(keys)}
    return pairs, counts


def verdict_from_response(data: dict) -> tuple[str | None, str]:
    """'first' / 'second' / None from a chat completion, and how it was read ('logprobs', 'text', 'none')."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        return None, "none"
    content = (choice.get("logprobs") or {}).get("content") or []
    if content:
        scores: dict[str, float] = {}
        for cand in [content[0]] + list(content[0].get("top_logprobs") or []):
            tok = str(cand.get("token", "")).strip().strip(".:()[]*\"'").upper()
            if tok in ("A", "B") and cand.get("logprob") is not None:
                scores[tok] = max(scores.get(tok, float("-inf")), float(cand["logprob"]))
        if scores:
            best = max(scores, key=scores.get)
            if len(scores) == 1 or scores["A"] != scores["B"]:
                return ("first" if best == "A" else "second"), "logprobs"
    text = str(((choice.get("message") or {}).get("content")) or choice.get("text") or "")
    found = re.findall(r"\b([AB])\b", text)
    if found:
        return ("first" if found[0] == "A" else "second"), "text"
    return None, "none"


class JudgeClient:
    """Chat completions on an OpenAI-compatible endpoint through the ``openai`` client, whose
    retries (with exponential backoff on 408, 409, 429, 5xx and connection errors) and timeout are
    the ones used; an endpoint that refuses ``logprobs`` is asked again without them."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_retries: int = 5,
                 timeout: float = 120.0, max_tokens: int = 4, top_logprobs: int = 20, client=None):
        if client is None:
            try:
                import openai
            except ImportError:
                raise ImportError("prlhf judge needs the openai client: pip install 'prlhf[judge]' "
                                  "(or pip install openai)") from None
            # the client refuses to start without a key; a local endpoint may need none
            client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=max_retries,
                                   timeout=timeout)
        self.client, self.url, self.model = client, base_url, model
        self.max_tokens, self.top_logprobs, self.logprobs = max_tokens, top_logprobs, True
        self.requests = 0
        self._lock = threading.Lock()

    def ask(self, text: str) -> dict:
        """The chat completion (as a dict) of one judging prompt, at temperature 0."""
        import openai

        kwargs = {"model": self.model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                  "max_tokens": self.max_tokens}
        if self.logprobs:
            kwargs.update(logprobs=True, top_logprobs=self.top_logprobs)
        with self._lock:
            self.requests += 1
        try:
            return self.client.chat.completions.create(**kwargs).model_dump()
        except openai.BadRequestError as err:
            if self.logprobs and "logprobs" in str(err):  # endpoints without log-probs: the text verdict
                self.logprobs = False
                return self.ask(text)
            raise RuntimeError(f"judge endpoint {self.url}: {err}") from None
        except openai.OpenAIError as err:
            raise RuntimeError(f"judge endpoint {self.url}: {err}") from None


class JudgmentCache:
    """One JSON line per judgment, appended as it is made; read back on start."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self._lock = threading.Lock()
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut off by a kill: judged again

    @staticmethod
    def key(template: str, model: str, prompt, first: str, second: str) -> str:
        raw = json.dumps([template, model, prompt, first, second], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, rec: dict) -> None:
        with self._lock:
            self.entries[key] = {"key": key, **rec}
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(self.entries[key], ensure_ascii=False) + "\n")


def combine(first_order: str | None, second_order: str | None) -> float | None:
    """A's score from the two orders (A shown first, then B shown first): 1 win, 0 loss, 0.5 when
    the orders disagree; None when either answer was unreadable."""
    if first_order is None or second_order is None:
        return None
    a_first = first_order == "first"
    a_second = second_order == "second"  # in the swapped order A is the second response
    if a_first and a_second:
        return 1.0
    if not a_first and not a_second:
        return 0.0
    return 0.5


def win_rates(scores: list[tuple[str | None, float | None]], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-sample and per-user win rates of A (ties half) with bootstrap intervals; ``scores`` is
    (user, score or None for invalid)."""
    valid = [(u, s) for u, s in scores if s is not None]
    per_user: dict = {}
    for u, s in valid:
        per_user.setdefault(u, []).append(s)
    user_means = {str(u): sum(v) / len(v) for u, v in per_user.items()}
    values = [s for _, s in valid]
    return {
        "n": len(scores), "valid": len(valid), "invalid": len(scores) - len(valid),
        "win_rate": {"per_sample": sum(values) / len(values) if values else None,
                     "per_user": sum(user_means.values()) / len(user_means) if user_means else None},
        "win_rate_ci": {"per_sample": bootstrap_ci(values, n_boot, seed=seed),
                        "per_user": bootstrap_ci(list(user_means.values()), n_boot, seed=seed)},
        "wins": sum(1 for s in values if s == 1.0), "losses": sum(1 for s in values if s == 0.0),
        "ties": sum(1 for s in values if s == 0.5), "per_user": user_means,
    }


def judge(generations: str | Path, a: str, b: str, base_url: str, model: str, template: str = "generic",
          api_key: str | None = None, cache: str | Path | None = None, concurrency: int = 4, max_pairs: int | None = None,
          progress=None, client: JudgeClient | None = None) -> dict:
    """Judge every (user, prompt) both methods answered; see the module docstring. Returns the
    ``judge.json`` content."""
    text = load_template(template)
    pairs, counts = read_pairs(generations, a, b)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    client = client or JudgeClient(base_url, model, api_key)
    store = JudgmentCache(cache)
    how: dict[str, int] = {}
    done, cached = [0], [0]
    lock = threading.Lock()

    def one(first: str, second: str, pair: dict) -> str | None:
        key = JudgmentCache.key(text, model, pair["prompt"], first, second)
        hit = store.get(key)
        if hit is not None:
            with lock:
                cached[0] += 1
        else:
            data = client.ask(fill(text, pair["prompt"], first, second, pair.get("user_text"), pair.get("user_id")))
            verdict, read = verdict_from_response(data)
            answer = ((data.get("choices") or [{}])[0].get("message") or {}).get("content")
            hit = {"verdict": verdict, "read": read, "answer": answer}
            store.put(key, hit)
        with lock:
            how[hit["read"]] = how.get(hit["read"], 0) + 1
        return hit["verdict"]

    def judge_pair(pair: dict) -> dict:
        v1 = one(pair["a"], pair["b"], pair)
        v2 = one(pair["b"], pair["a"], pair)
        with lock:
            done[0] += 1
            if progress:
                progress(done[0], len(pairs))
        return {"user_id": pair["user_id"], "prompt": pair["prompt"], "a_first": v1, "b_first": v2,
                "score": combine(v1, v2)}

    requests_before = client.requests
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = list(pool.map(judge_pair, pairs))
    out = win_rates([(r["user_id"], r["score"]) for r in results])
    out.update({"a": a, "b": b, "judge": {"base_url": base_url, "model": model}, "template": template,
                "generations": str(generations), "verdicts_read_from": how, "unpaired": counts,
                "requests": client.requests - requests_before, "cached_judgments": cached[0], "samples": results})
    return out


def api_key_from_env(name: str | None) -> str | None:
    return os.environ.get(name) if name else None
