"""Using a personalized reward model with a policy: best-of-n sampling reranked per user
(``sample_candidates``, ``rerank``, ``best_of_n``) and ``PersonalizedRewardFunction``, a reward
function for TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``)."""

from __future__ import annotations

import torch

from .modeling import PersonalizedLM
from .reward_model import PersonalizedRewardModel


def _text_of(completion) -> str:
    """A completion as text: TRL passes text, or chat messages for conversational data."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(str(m["content"]) for m in completion)
    raise ValueError(f"a completion must be text or chat messages ({{'role', 'content'}}), got {type(completion).__name__}")


class PersonalizedRewardFunction:
    """A reward function for TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``): TRL calls it
    with ``prompts``, ``completions`` and the data set's other columns as keyword arguments; it reads
    each row's user from ``user_column`` (default ``user_id``; absent or unknown: the generic user)
    and, when present, the user's text from ``user_text_column``, and scores every completion for its
    user in batches. With TRL's ``log_metric`` it also logs the mean reward per user
    (``{name}/user/{id}``, for at most ``log_per_user_max`` users).

    It is deliberately not an ``nn.Module`` (TRL would call a module as a sequence classifier)::

        reward = PersonalizedRewardFunction(PersonalizedRewardModel.from_pretrained("outputs/prm"))
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], train_dataset=prompts_with_user_id, ...)
    """

    def __init__(self, rm: PersonalizedRewardModel, batch_size: int = 16, max_length: int | None = 1024,
                 max_prompt_length: int | None = 512, user_column: str = "user_id", user_text_column: str = "user_text",
                 name: str = "prm", log_per_user_max: int = 20):
        self.rm, self.batch_size = rm, batch_size
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.user_column, self.user_text_column = user_column, user_text_column
        self.__name__ = name  # TRL's name for the reward in its logs: rewards/{name}/mean
        self.log_per_user_max = log_per_user_max

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        n = len(prompts)
        users = kwargs.get(self.user_column)
        users = [None if u is None else str(u) for u in users] if users is not None else [None] * n
        texts = kwargs.get(self.user_text_column)
        rewards = self.rm.score(list(prompts), [_text_of(c) for c in completions], users, texts, self.batch_size,
                                self.max_length, self.max_prompt_length, source="completions to score")
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and len(self.rm.registry) <= self.log_per_user_max:
            by_user: dict[str, list[float]] = {}
            for u, r in zip(users, rewards):
                by_user.setdefault(u if u in self.rm.registry else "generic", []).append(r)
            for u, rs in sorted(by_user.items()):
                log_metric(f"{self.__name__}/user/{u}", sum(rs) / len(rs))
        return rewards


def rerank(rm: PersonalizedRewardModel, prompts: list, user_ids: list, candidates: list[list[str]],
           user_texts: list | None = None, batch_size: int = 64, max_length: int | None = 1024,
           max_prompt_length: int | None = 512) -> list[dict]:
    """Score each prompt's candidate responses for its user and pick the highest:
    ``{"response", "reward", "candidates": [{"response", "reward"}, ...]}`` per prompt."""
    user_texts = list(user_texts) if user_texts is not None else [None] * len(prompts)
    flat = [(p, c, u, t) for p, u, t, cs in zip(prompts, user_ids, user_texts, candidates) for c in cs]
    rewards = rm.score([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], [f[3] for f in flat],
                       batch_size, max_length, max_prompt_length) if flat else []
    out, k = [], 0
    for cs in candidates:
        scored = [{"response": c, "reward": r} for c, r in zip(cs, rewards[k:k + len(cs)])]
        k += len(cs)
        best = max(scored, key=lambda c: c["reward"])
        out.append({"response": best["response"], "reward": best["reward"], "candidates": scored})
    return out


@torch.no_grad()
def sample_candidates(policy: PersonalizedLM, prompts: list, user_ids: list | None = None, user_texts: list | None = None,
                      n: int = 8, batch_size: int = 8, max_new_tokens: int = 64, temperature: float = 1.0,
                      top_p: float = 1.0, progress=None, **generate_kwargs) -> list[list[str]]:
    """``n`` sampled responses per prompt from ``policy``, each row for its user; ``batch_size``
    prompts (``batch_size * n`` rows) per ``generate()`` call."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    total = len(prompts)
    user_ids = list(user_ids) if user_ids is not None else [None] * total
    user_texts = list(user_texts) if user_texts is not None else [None] * total
    if not len(user_ids) == len(user_texts) == total:
        raise ValueError(f"{total} prompts but {len(user_ids)} user ids and {len(user_texts)} user texts")
    rep = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731 - each item n times, in order
    out = []
    for s in range(0, total, batch_size):
        p, u, t = prompts[s:s + batch_size], user_ids[s:s + batch_size], user_texts[s:s + batch_size]
        # generate(): with a before_response policy the n rows of a prompt share its KV cache
        texts = policy.generate(rep(p), rep(u), rep(t), do_sample=True, temperature=temperature, top_p=top_p,
                                max_new_tokens=max_new_tokens, **generate_kwargs)
        out += [texts[i * n:(i + 1) * n] for i in range(len(p))]
        if progress:
            progress(min(s + batch_size, total), total)
    return out


def best_of_n(policy: PersonalizedLM, rm: PersonalizedRewardModel, prompts: list, user_ids: list | None = None,
              user_texts: list | None = None, n: int = 8, batch_size: int = 8, max_new_tokens: int = 64,
              temperature: float = 1.0, top_p: float = 1.0, max_length: int | None = 1024,
              max_prompt_length: int | None = 512, progress=None, **generate_kwargs) -> list[dict]:
    """Personalized best-of-n: ``n`` sampled responses per prompt from ``policy`` (any causal LM
    wrapped as a ``PersonalizedLM``, personalized or not; each row for its user), each scored by the
    P-RM for the prompt's user; returns per prompt ``{"response", "reward", "candidates": [{"response",
    "reward"}, ...]}`` with the highest-reward response."""
    user_ids = list(user_ids) if user_ids is not None else [None] * len(prompts)
    candidates = sample_candidates(policy, prompts, user_ids, user_texts, n, batch_size, max_new_tokens, temperature,
                                   top_p, progress, **generate_kwargs)
    return rerank(rm, prompts, user_ids, candidates, user_texts, max(1, batch_size * n), max_length, max_prompt_length)
