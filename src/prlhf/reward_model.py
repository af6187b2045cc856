"""The personalized reward model (P-RM), the reward side of P-RLHF.

``PersonalizedRewardModel`` is the user model of this project (uniform / individual / cluster,
implicit and explicit) feeding the same soft prompt to a causal LM backbone, with a scalar head on
the hidden state of the last real token (with the default ``after_response`` layout, the user's
last token after ``[BOS] [prompt] [response]``). Its objective (``prlhf.losses.prm_loss``) mixes
Bradley-Terry terms as P-DPO mixes its DPO terms; ``prlhf.trainers.prm.PRMTrainer`` trains it.
The model folder is the policy's (base or LoRA adapter, user model, users.json, config,
manifest) plus ``reward_head.safetensors``. Uses: ``evaluate_reward_accuracy`` (the
``metrics.json`` of ``prlhf rm eval``), ``PersonalizedRewardModel.score`` and ``prlhf.best_of_n``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .collate import PreferenceCollator
from .config.training import PRMConfig
from .data import tokenize_dataset
from .evaluation import score_pairs
from .guards import check_finite
from .modeling import PersonalizedLM
from .scoring import backbone_and_head, position_ids_from_mask
from .storage import IntegrityError
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
        parts = backbone_and_head(self.plm.llm)
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
    plm = PersonalizedLM.build(args.personalization_config(), registry, lora_kwargs=args.lora_kwargs(),
                               trust_remote_code=args.trust_remote_code, load_kwargs=args.load_kwargs())
    return PersonalizedRewardModel(plm)


def evaluate_reward_accuracy(rm: PersonalizedRewardModel, records: list[dict], batch_size: int = 16,
                             max_length: int | None = 1024, max_prompt_length: int | None = 512) -> dict:
    """Reward accuracy on held-out pairs (r(chosen) > r(rejected)), in the shape of ``prlhf eval``'s
    ``metrics.json``: overall, seen (own user), generic (the same pairs, generic user), unseen
    (generic user), per user, with bootstrap CIs; plus per-pair results under ``pairs``."""
    rm.eval()
    settings = rm.plm.tokenize_settings(max_length, max_prompt_length)
    return score_pairs(rm, records, settings, lambda examples, rows, same_tokens=True: rm.pair_margins(examples, rows, batch_size))
