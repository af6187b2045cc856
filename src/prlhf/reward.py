"""The reward side of P-RLHF: a personalized reward model (P-RM).

``PersonalizedRewardModel`` is the user model of this project (uniform / individual / cluster,
implicit and explicit) feeding the same soft prompt to a causal LM backbone, with a scalar head on
the hidden state of the last real token of ``[BOS] [user] [prompt] [response]``. Its loss mixes
Bradley-Terry terms as P-DPO mixes its DPO terms:

    L = alpha * BT(r(x, y_w, u) - r(x, y_l, u)) + (1 - alpha) * BT(r(x, y_w, u0) - r(x, y_l, u0))

with BT(m) = -log sigmoid(m) and u0 the generic user (row 0), plus an optional centring term
``center_rewards_coefficient * (r_w + r_l)^2`` per term (TRL's ``RewardTrainer``). ``PRMTrainer``
is a ``transformers.Trainer``; the model folder is the policy's (base or LoRA adapter, user model,
users.json, config, manifest) plus ``reward_head.safetensors``.

Uses of a trained P-RM: ``evaluate_reward_accuracy`` (the ``metrics.json`` of ``prlhf eval``),
``PersonalizedRewardModel.score`` (rows of prompt, response, user), ``best_of_n`` (personalized
reranking of a policy's samples) and ``PersonalizedRewardFunction`` (a reward function for TRL's
online trainers, ``GRPOTrainer`` and ``RLOOTrainer``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .collate import PreferenceCollator
from .config import PRMConfig
from .data import load_preference_data, tokenize_dataset
from .evaluation import score_pairs
from .guards import check_finite
from .health import health_split
from .losses import draw_user_terms, prm_loss
from .modeling import PersonalizedLM
from .scoring import _backbone_and_head, position_ids_from_mask
from .storage import IntegrityError
from .trainer import _load_records, _PreferenceTrainer, disable_dropout, personalization_config
from .users import GENERIC_ROW, UserRegistry

logger = logging.getLogger(__name__)

HEAD_NAME = "reward_head.safetensors"


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position of each row (left or right padding alike)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


class PersonalizedRewardModel(nn.Module):
    """r(x, y, u): a ``PersonalizedLM`` backbone (with its user model) and a scalar head."""

    def __init__(self, plm: PersonalizedLM, head: nn.Linear | None = None):
        super().__init__()
        self.plm = plm
        hidden = plm.llm.get_input_embeddings().weight.shape[1]
        if head is None:
            head = nn.Linear(hidden, 1, bias=False)
            g = torch.Generator().manual_seed(plm.prlhf_config.seed)  # the same head for the same seed
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) / (hidden + 1) ** 0.5)
        self.head = head.to(plm.device)

    # what transformers.Trainer and the evaluation helpers look for
    @property
    def config(self):
        return self.plm.config

    @property
    def device(self) -> torch.device:
        return self.plm.device

    @property
    def registry(self) -> UserRegistry:
        return self.plm.registry

    @property
    def tokenizer(self):
        return self.plm.tokenizer

    @property
    def prlhf_config(self):
        return self.plm.prlhf_config

    @property
    def user_model(self):
        return self.plm.user_model

    def forward(self, input_ids, attention_mask, implicit_mask=None, user_rows=None, **kwargs) -> torch.Tensor:
        """Rewards (N,) of rows ``[BOS] [user] [prompt] [response]`` for the given user rows (N,)
        (default: the generic user): the head on the last real token's final hidden state."""
        if user_rows is None:
            user_rows = torch.full((input_ids.shape[0],), GENERIC_ROW, dtype=torch.long, device=input_ids.device)
        embeds = self.plm.embed(input_ids, implicit_mask, user_rows)
        kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        parts = _backbone_and_head(self.plm.llm)
        if parts is not None:  # the decoder alone: no LM head over the vocabulary
            hidden = parts[0](**kwargs).last_hidden_state
        else:
            hidden = self.plm.llm(**kwargs, output_hidden_states=True).hidden_states[-1]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1)

    def batch_rewards(self, batch: dict, user_rows: torch.Tensor, chosen_only: bool = False) -> torch.Tensor:
        """Rewards of a plain collated preference batch (chosen rows, then rejected rows: (2B,)),
        each pair under ``user_rows`` (B,); ``chosen_only``: the chosen rows alone (B,)."""
        n = user_rows.shape[0] if chosen_only else 2 * user_rows.shape[0]
        implicit = batch.get("implicit_mask")
        rows = user_rows if chosen_only else torch.cat([user_rows, user_rows])
        return self(batch["input_ids"][:n], batch["attention_mask"][:n], None if implicit is None else implicit[:n], rows)

    def collator(self, padding_side: str = "right") -> PreferenceCollator:
        """Plain rows (chosen rows, then rejected rows): each response's last token is its own."""
        return self.plm.collator(padding_side)

    def pair_margins(self, examples: list[dict], rows: list[int], batch_size: int = 16) -> list[float]:
        """r(chosen) - r(rejected) of tokenized pairs under the given user rows."""
        collate = self.collator()
        out = []
        with torch.no_grad():
            for s in range(0, len(examples), batch_size):
                batch = {k: v.to(self.device) for k, v in collate(examples[s:s + batch_size]).items()}
                r = self.batch_rewards(batch, torch.tensor(rows[s:s + batch_size], device=self.device))
                B = r.shape[0] // 2
                out.extend((r[:B] - r[B:]).tolist())
        return out

    @torch.no_grad()
    def score(self, prompts: list, responses: list, user_ids: list | None = None, user_texts: list | None = None,
              batch_size: int = 16, max_length: int | None = 1024, max_prompt_length: int | None = 512,
              source: str = "rows to score") -> list[float]:
        """Rewards of (prompt, response, user) rows; unknown users are scored by the generic user, a
        user without a text here by the text of the training data. Prompts are text or chat
        messages, as in preference data; rows that cannot be tokenized are an error."""
        n = len(prompts)
        if len(responses) != n:
            raise ValueError(f"{n} prompts but {len(responses)} responses")
        user_ids = list(user_ids) if user_ids is not None else [None] * n
        user_texts = list(user_texts) if user_texts is not None else [None] * n
        # a user without a text here has the one of the training data, as in generation
        user_texts = [t or (self.registry.user_texts.get(str(u)) if u is not None else None) for u, t in zip(user_ids, user_texts)]
        records = [{"prompt": p, "chosen": r, "rejected": r, "user_id": u, "user_text": t}
                   for p, r, u, t in zip(prompts, responses, user_ids, user_texts)]
        settings = self.plm.tokenize_settings(max_length, max_prompt_length)
        examples = tokenize_dataset(records, self.tokenizer, settings, self.registry, source)
        if len(examples) != n:
            raise ValueError(f"{source}: {n - len(examples)} of {n} rows could not be scored (too long for max_length "
                             f"{max_length}?)")
        out = [float("nan")] * n
        collate = self.collator()
        was = self.training
        self.eval()
        try:
            for s in range(0, n, batch_size):
                chunk = examples[s:s + batch_size]
                batch = {k: v.to(self.device) for k, v in collate(chunk).items()}
                for ex, v in zip(chunk, self.batch_rewards(batch, batch["user_rows"], chosen_only=True).tolist()):
                    out[ex["index"]] = v
        finally:
            self.train(was)
        return out

    # -- save / load ------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, extra_files: dict[str, str] | None = None,
                        card_training: dict | None = None, card_metrics: dict | None = None,
                        state_dict: dict | None = None) -> None:
        """The policy's folder (``PersonalizedLM.save_pretrained``, atomic, with a manifest) plus
        ``reward_head.safetensors``; ``state_dict``: the full state dict a sharded run gathered."""
        head = state_dict["head.weight"] if state_dict is not None else self.head.weight
        check_finite({"reward head": head.detach()}, f"the reward head to save in {directory}")
        plm_state = {k[len("plm."):]: v for k, v in state_dict.items() if k.startswith("plm.")} if state_dict else None
        self.plm.save_pretrained(directory, state_dict=plm_state, extra_files=extra_files, card_training=card_training,
                                 card_metrics=card_metrics, extra_tensors={HEAD_NAME: {"weight": head}},
                                 card_kind="reward")

    @staticmethod
    def read_head(directory: str | os.PathLike) -> torch.Tensor:
        path = Path(directory) / HEAD_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a reward model ({HEAD_NAME} missing: a policy folder? "
                                    "`prlhf rm train` writes reward models)")
        try:
            weight = load_file(str(path))["weight"]
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types for damaged files
            raise IntegrityError(f"{path}: unreadable reward head ({err})") from None
        if weight.dim() != 2 or weight.shape[0] != 1:
            raise IntegrityError(f"{path}: the reward head has shape {tuple(weight.shape)}, expected (1, hidden size)")
        return weight

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, is_trainable: bool = False, device=None,
                        **load_kwargs) -> "PersonalizedRewardModel":
        """Restore a saved P-RM (verified against its manifest, as ``PersonalizedLM.from_pretrained``)."""
        weight = cls.read_head(directory)  # before loading the backbone: a policy folder fails fast
        plm = PersonalizedLM.from_pretrained(directory, is_trainable=is_trainable, device=device, **load_kwargs)
        hidden = plm.llm.get_input_embeddings().weight.shape[1]
        if weight.shape[1] != hidden:
            raise IntegrityError(f"{Path(directory) / HEAD_NAME}: the head takes {weight.shape[1]} features but the "
                                 f"backbone's hidden size is {hidden}")
        head = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            head.weight.copy_(weight)
        model = cls(plm, head)
        model.eval()
        return model

    def load_weights_from(self, directory: str | os.PathLike) -> None:
        """A checkpoint's weights (backbone or adapter, user model, head) into this model in place."""
        self.plm.load_weights_from(directory)
        with torch.no_grad():
            self.head.weight.copy_(self.read_head(directory))


def build_reward_model(args: PRMConfig, registry: UserRegistry) -> PersonalizedRewardModel:
    """A fresh P-RM: the backbone of ``model_name_or_path`` (LoRA or full), the user model of
    ``args`` for the users of ``registry``, a new head."""
    plm = PersonalizedLM.build(personalization_config(args), registry, lora_kwargs=args.lora_kwargs(),
                               trust_remote_code=args.trust_remote_code, load_kwargs=args.load_kwargs())
    return PersonalizedRewardModel(plm)


class PRMTrainer(_PreferenceTrainer):
    """Trains a ``PersonalizedRewardModel`` (backbone or LoRA adapter, user model and head) with the
    P-RM loss. Terms as in ``PDPOTrainer``: one forward pass for both terms (or, with
    ``alpha_sampling``, one term drawn per pair), the generic term skipped where it cannot differ
    (alpha 1, ``none`` / ``uniform`` user models). Logs ``rewards/accuracies`` (user term),
    ``rewards_generic/accuracies``, margins and per-user accuracy."""

    def __init__(self, model: PersonalizedRewardModel | None = None, args: PRMConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        args = args or PRMConfig()
        train_records = _load_records(train_dataset if train_dataset is not None else args.train_file, "train")
        eval_source = eval_dataset if eval_dataset is not None else args.eval_file
        eval_records = load_preference_data(eval_source) if eval_source is not None else None
        train_records, eval_records, self.health_groups = health_split(args, train_records, eval_records)
        if model is None:
            model = build_reward_model(args, UserRegistry.from_records(train_records))
        tok = processing_class or model.tokenizer
        settings = model.plm.tokenize_settings(args.max_length, args.max_prompt_length)
        train = tokenize_dataset(train_records, tok, settings, model.registry, args.train_file or "train_dataset")
        evals = tokenize_dataset(eval_records, tok, settings, model.registry, args.eval_file or "eval_dataset") if eval_records else None
        if args.disable_dropout:
            disable_dropout(model)
        super().__init__(model=model, args=args, data_collator=model.collator(args.padding_side), train_dataset=train,
                         eval_dataset=evals, processing_class=tok, **kwargs)

    def pair_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        rm: PersonalizedRewardModel = self.accelerator.unwrap_model(model)
        user_rows = batch["user_rows"]
        B = user_rows.shape[0]
        alpha = self.args.alpha
        need_user, need_generic = self.terms_needed(rm)
        generic_rows = torch.full_like(user_rows, GENERIC_ROW)
        gen = None
        if need_user and need_generic and self.args.alpha_sampling and model.training:
            # one term per pair, the user's with probability alpha: the same expected loss, half the work
            use_user = draw_user_terms(B, alpha, user_rows.device)
            r = model(batch["input_ids"], batch["attention_mask"], batch.get("implicit_mask"),
                      torch.where(use_user, user_rows, generic_rows).repeat(2))
            losses = prm_loss((r[:B], r[B:]), None, 1.0, self.args.center_rewards_coefficient)
            hit = (r[:B] > r[B:]).float()
            metrics = self._reward_metrics(r[:B], r[B:])
            g = self.accelerator.gather_for_metrics
            use_user, hit, rows_all = g(use_user), g(hit), g(user_rows)
            # accuracies per term over the pairs that drew it (a term no pair drew logs nothing this step)
            if bool(use_user.any()):
                metrics["rewards/accuracies"] = hit[use_user].mean().item()
            if bool((~use_user).any()):
                metrics["rewards_generic/accuracies"] = hit[~use_user].mean().item()
            metrics["_hits"] = (rows_all[use_user].tolist(), hit[use_user].tolist())
            return losses.mean(), metrics
        terms = ([user_rows] if need_user else []) + ([generic_rows] if need_generic else [])
        n = len(terms)
        # ONE forward pass: every term's chosen and rejected rows
        rep = lambda t: t.repeat(n, 1) if t is not None else None  # noqa: E731
        r = model(rep(batch["input_ids"]), rep(batch["attention_mask"]), rep(batch.get("implicit_mask")),
                  torch.cat([torch.cat([rows, rows]) for rows in terms]))
        per_term = [(r[2 * B * k:2 * B * k + B], r[2 * B * k + B:2 * B * (k + 1)]) for k in range(n)]
        if need_user and need_generic:
            user, gen = per_term
            losses = prm_loss(user, gen, alpha, self.args.center_rewards_coefficient)
        else:
            user = per_term[0]
            losses = prm_loss(user, None, 1.0, self.args.center_rewards_coefficient)
        metrics = self._reward_metrics(*user)
        g = self.accelerator.gather_for_metrics
        hit = g((user[0] > user[1]).float())
        metrics["rewards/accuracies"] = hit.mean().item()
        if gen is not None:
            gw, gl = g(gen[0].detach()), g(gen[1].detach())
            metrics["rewards_generic/accuracies"] = (gw > gl).float().mean().item()
            metrics["rewards_generic/margins"] = (gw - gl).mean().item()
            metrics["_generic_hits"] = (gw > gl).float().tolist()
        metrics["_hits"] = (g(user_rows).tolist(), hit.tolist())
        return losses.mean(), metrics

    def _reward_metrics(self, rw: torch.Tensor, rl: torch.Tensor) -> dict:
        g = self.accelerator.gather_for_metrics
        rw, rl = g(rw.detach()), g(rl.detach())
        return {"rewards/chosen": rw.mean().item(), "rewards/rejected": rl.mean().item(),
                "rewards/margins": (rw - rl).mean().item()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        state_dict = self.full_state_dict()
        if self.args.should_save:
            a = self.args
            training = {"training data": a.train_file, "steps": self.state.global_step, "loss": "Bradley-Terry",
                        "center_rewards_coefficient": a.center_rewards_coefficient or None,
                        **a.effective_settings()}
            self.accelerator.unwrap_model(self.model).save_pretrained(
                output_dir, extra_files={"training_args.json": a.to_json_string()}, card_training=training,
                state_dict=state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_weights_from(self.state.best_model_checkpoint)


def evaluate_reward_accuracy(rm: PersonalizedRewardModel, records: list[dict], batch_size: int = 16,
                             max_length: int | None = 1024, max_prompt_length: int | None = 512) -> dict:
    """Reward accuracy on held-out pairs (r(chosen) > r(rejected)), in the shape of ``prlhf eval``'s
    ``metrics.json``: overall, seen (own user), generic (the same pairs, generic user), unseen
    (generic user), per user, with bootstrap CIs; plus per-pair results under ``pairs``."""
    rm.eval()
    settings = rm.plm.tokenize_settings(max_length, max_prompt_length)
    return score_pairs(rm, records, settings, lambda examples, rows, same_tokens=True: rm.pair_margins(examples, rows, batch_size))


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


__all__ = ["PersonalizedRewardModel", "PRMTrainer", "last_token_index",
           "build_reward_model", "evaluate_reward_accuracy", "PersonalizedRewardFunction", "best_of_n",
           "sample_candidates", "rerank"]
