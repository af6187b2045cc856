"""Injection: a user embedding e_u prepended to any causal LM as a soft prompt.

``PersonalizedLM`` wraps any ``AutoModelForCausalLM`` (or a peft LoRA model around it) and
reaches it only through its public interface: ``get_input_embeddings()``, ``inputs_embeds``,
``attention_mask`` and ``position_ids``. The collator (``prlhf.data``) lays each sequence out as
``[BOS] [T_u implicit slots] [user text] [prompt] [response]``; here the token embeddings of the
slots are replaced by the implicit user embedding (B, T_u, d), while the user text is embedded by
the LLM's own table (the explicit user model). Position ids are ``cumsum(attention_mask) - 1``,
so left and right padding give the same log-probs for real tokens.

The reference pi_SFT(y|x) sees no user input: the same layout with every user position masked
out of the attention (positions skip them too), which equals the plain prompt+response sequence.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import TokenizeSettings, build_sequence, collate_sequences, tokenize_prompt, with_user_id
from .losses import sequence_logps
from .models import load_model_and_tokenizer
from .user_models import ImplicitUserModel, build_user_model, encode_user_text
from .users import GENERIC_ROW, UserRegistry

logger = logging.getLogger(__name__)

CONFIG_NAME = "prlhf_config.json"
USER_MODEL_NAME = "user_model.safetensors"
USERS_NAME = "users.json"


@dataclass
class PersonalizationConfig:
    """What a saved personalized model needs to be rebuilt (written as ``prlhf_config.json``)."""

    base_model_name_or_path: str
    user_model: str = "individual"
    n_user_tokens: int = 10
    n_clusters: int = 10
    cluster_weighting: str = "softmax"
    user_init: str = "vocab"
    max_user_text_tokens: int = 128
    use_lora: bool = False
    reference_model_name_or_path: str | None = None  # pi_SFT; None with LoRA: the base, adapters disabled
    user_id_prompt: str | None = None  # baseline: user id written into the prompt (see data.with_user_id)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def n_implicit_tokens(self) -> int:
        return 0 if self.user_model == "none" else self.n_user_tokens


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens: the first real token is at 0 whatever the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _atomic_write_dir(target: Path, write) -> None:
    """Write files into ``target`` all-or-nothing per file: everything goes to a temporary folder
    first, then each file is moved in with ``os.replace``, ``prlhf_config.json`` last."""
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=target))
    try:
        write(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME)
        for name in names:
            src, dst = tmp / name, target / name
            if src.is_dir():
                if dst.exists():
                    shutil.rmtree(dst)
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PersonalizedLM(nn.Module):
    """A causal LM personalized by a user model (P-RLHF's pi_P(y | x, u))."""

    def __init__(self, llm: nn.Module, tokenizer, registry: UserRegistry, config: PersonalizationConfig,
                 user_model: ImplicitUserModel | None):
        super().__init__()
        self.llm = llm
        self.user_model = user_model
        self.tokenizer = tokenizer
        self.registry = registry
        self.prlhf_config = config

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def build(cls, config: PersonalizationConfig, registry: UserRegistry, llm=None, tokenizer=None,
              lora_kwargs: dict | None = None, trust_remote_code: bool = False) -> "PersonalizedLM":
        """A fresh user model around ``config.base_model_name_or_path`` (or the given ``llm``)."""
        if llm is None:
            llm, tokenizer = load_model_and_tokenizer(config.base_model_name_or_path, trust_remote_code=trust_remote_code)
        table = llm.get_input_embeddings().weight
        user_model = build_user_model(
            config.user_model, registry.n_rows, config.n_user_tokens, table.shape[1], config.n_clusters,
            config.cluster_weighting, config.user_init, table, config.seed,
        )
        if config.use_lora:
            from peft import LoraConfig, get_peft_model

            llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **(lora_kwargs or {})))
        return cls(llm, tokenizer, registry, config, user_model)

    # -- the HF-facing surface that Trainer and accelerate use -------------------------------

    @property
    def config(self):
        return self.llm.config

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def is_lora(self) -> bool:
        return hasattr(self.llm, "disable_adapter") and hasattr(self.llm, "peft_config")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if self.is_lora:
            self.llm.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        self.llm.gradient_checkpointing_disable()

    # -- forward ------------------------------------------------------------------------------

    @property
    def n_implicit_tokens(self) -> int:
        return self.prlhf_config.n_implicit_tokens if self.user_model is not None else 0

    def embed(self, input_ids: torch.Tensor, implicit_mask: torch.Tensor | None, user_rows: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (N, T, d) with the implicit user embedding scattered into the slots."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (N, T, d)
        if self.user_model is None or implicit_mask is None or not bool(implicit_mask.any()):
            return embeds
        users = self.user_model(user_rows).to(embeds.dtype)  # (N, T_u, d)
        return embeds.masked_scatter(implicit_mask.unsqueeze(-1), users)

    def forward(self, input_ids, attention_mask, implicit_mask=None, user_rows=None, **kwargs):
        """Logits (N, T, V) of sequences laid out by the collator, for users ``user_rows`` (N,)."""
        embeds = self.embed(input_ids, implicit_mask, user_rows)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **kwargs,
        ).logits

    def sequence_logps(self, batch: dict, user_rows: torch.Tensor) -> torch.Tensor:
        """log pi_P(y | x, u) summed over response tokens, for the sequences of a collated batch.
        ``user_rows`` has one entry per sequence (N,)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["implicit_mask"], user_rows)
        return sequence_logps(logits, batch["labels"])

    @torch.no_grad()
    def reference_logps(self, batch: dict, reference: nn.Module | None = None) -> torch.Tensor:
        """log pi_SFT(y | x): user positions masked out; ``reference`` a frozen LM, or None for this
        model's base with its LoRA adapters disabled."""
        attention_mask = batch["attention_mask"] * (~batch["user_mask"]).long()
        kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        if reference is None:
            if not self.is_lora:
                raise ValueError("a reference model is needed unless the policy is a LoRA model")
            with self.llm.disable_adapter():
                logits = self.llm(input_ids=batch["input_ids"], **kwargs).logits
        else:
            logits = reference(input_ids=batch["input_ids"], **kwargs).logits
        return sequence_logps(logits, batch["labels"])

    def tokenize_settings(self, max_length: int | None, max_prompt_length: int | None):
        """How this model's training and evaluation data are tokenized."""
        cfg = self.prlhf_config
        return TokenizeSettings(max_length, max_prompt_length, cfg.max_user_text_tokens, self.n_implicit_tokens,
                                cfg.user_id_prompt)

    # -- generation ---------------------------------------------------------------------------

    def user_rows_for(self, user_ids) -> torch.Tensor:
        return torch.tensor([self.registry.row(u) for u in user_ids], dtype=torch.long, device=self.device)

    def prepare_prompts(self, prompts: list, user_ids: list, user_texts: list | None = None) -> dict:
        """Left-padded generation inputs: ``[BOS] [slots] [user text] [prompt]`` per row.

        A user's text comes from ``user_texts`` when given, else from the registry (training data)."""
        tok, cfg = self.tokenizer, self.prlhf_config
        seqs = []
        for i, (prompt, uid) in enumerate(zip(prompts, user_ids)):
            text = user_texts[i] if user_texts is not None else None
            if not text and uid is not None:
                text = self.registry.user_texts.get(str(uid))
            text_ids = encode_user_text(tok, text, cfg.max_user_text_tokens)
            prompt_ids = tokenize_prompt(tok, with_user_id(prompt, uid, cfg.user_id_prompt))
            seqs.append(build_sequence(prompt_ids, [], text_ids, self.n_implicit_tokens, tok.bos_token_id, tok.pad_token_id))
        batch = {k: v.to(self.device) for k, v in collate_sequences(seqs, tok.pad_token_id, "left").items()}
        batch["user_rows"] = self.user_rows_for(user_ids)
        return batch

    @torch.no_grad()
    def generate(self, prompts: list, user_ids: list | None = None, user_texts: list | None = None,
                 skip_special_tokens: bool = True, **generate_kwargs) -> list[str]:
        """Responses for a batch of prompts, each for its own user (``None``/unknown: the generic
        user), in one ``generate()`` call with the KV cache."""
        user_ids = list(user_ids) if user_ids is not None else [None] * len(prompts)
        if len(user_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(user_ids)} user ids")
        ids = self.generate_ids(self.prepare_prompts(prompts, user_ids, user_texts), **generate_kwargs)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    @torch.no_grad()
    def generate_ids(self, batch: dict, **generate_kwargs) -> torch.Tensor:
        """New token ids (N, T_new) for a batch from ``prepare_prompts``; pads after EOS."""
        embeds = self.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])
        generate_kwargs.setdefault("max_new_tokens", 64)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        was_training = self.training
        self.eval()
        try:
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **generate_kwargs)
        finally:
            self.train(was_training)
        return out  # decoder-only generate with inputs_embeds returns only the new tokens

    # -- save / load --------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None) -> None:
        """Write the base model (or LoRA adapter), tokenizer, user model (safetensors), user
        registry and ``prlhf_config.json``; each file is written atomically."""

        def write(tmp: Path):
            self.llm.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.user_model is not None:
                tensors = {k: v.detach().cpu().contiguous() for k, v in self.user_model.state_dict().items()}
                save_file(tensors, str(tmp / USER_MODEL_NAME), metadata={"format": "pt", "kind": self.prlhf_config.user_model})
            self.registry.save(tmp / USERS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.prlhf_config), indent=1))

        _atomic_write_dir(Path(save_directory), write)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, trust_remote_code: bool = False,
                        is_trainable: bool = False) -> "PersonalizedLM":
        """Restore a model written by ``save_pretrained``."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_NAME
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: not a prlhf model ({CONFIG_NAME} missing)")
        config = PersonalizationConfig(**json.loads(cfg_path.read_text()))
        registry = UserRegistry.load(directory / USERS_NAME)
        if config.use_lora:
            from peft import PeftModel

            base, _ = load_model_and_tokenizer(config.base_model_name_or_path, trust_remote_code=trust_remote_code)
            llm = PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
            tokenizer = _load_tokenizer(directory, trust_remote_code)
        else:
            llm, tokenizer = load_model_and_tokenizer(str(directory), trust_remote_code=trust_remote_code)
        table = llm.get_input_embeddings().weight
        user_model = build_user_model(
            config.user_model, registry.n_rows, config.n_user_tokens, table.shape[1], config.n_clusters,
            config.cluster_weighting, "random", None, config.seed,
        )
        if user_model is not None:
            user_model.load_state_dict(load_file(str(directory / USER_MODEL_NAME)))
        model = cls(llm, tokenizer, registry, config, user_model)
        model.eval()
        return model

    def load_weights_from(self, directory: str | os.PathLike) -> None:
        """Load a checkpoint's weights into this model in place (used to resume training)."""
        directory = Path(directory)
        if self.is_lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.llm, load_file(str(directory / "adapter_model.safetensors")))
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(str(directory), dtype=next(self.llm.parameters()).dtype)
            self.llm.load_state_dict(loaded.state_dict())
        if self.user_model is not None:
            self.user_model.load_state_dict(load_file(str(directory / USER_MODEL_NAME)))


def _load_tokenizer(directory: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def generic_rows_like(user_rows: torch.Tensor) -> torch.Tensor:
    """The generic user (row 0) in place of every user: P-DPO's Delta_P0 term."""
    return torch.full_like(user_rows, GENERIC_ROW)
