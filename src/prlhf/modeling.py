"""Injection: a user embedding e_u prepended to any causal LM as a soft prompt.

``PersonalizedLM`` wraps any ``AutoModelForCausalLM`` (or a peft LoRA model around it) and
reaches it only through its public interface: ``get_input_embeddings()``, ``inputs_embeds``,
``attention_mask`` and ``position_ids``. The collator (``prlhf.data``) lays each sequence out as
``[BOS] [T_u implicit slots] [user text] [prompt] [response]``; here the token embeddings of the
slots are replaced by the implicit user embedding (B, T_u, d), while the user text is embedded by
the LLM's own table (the explicit user model). Position ids are ``cumsum(attention_mask) - 1``,
so left and right padding give the same log-probs for real tokens.

The reference pi_SFT(y|x) sees no user input: the same layout with every user position masked
out of the attention (positions skip them too), which equals the plain prompt+response sequence
(``prlhf.reference.reference_pair_logps``).

Training scores pairs through ``term_logps``: the collator's flat response targets let the LM head
run at response positions only (the backbone through ``get_decoder()``, the head through
``get_output_embeddings()``), and a packed batch (``[prefix] [prompt] [chosen] [rejected]`` per
pair, see ``prlhf.collate.PreferenceCollator``) gets a 4D attention mask in which rejected does not
see chosen and position ids that restart rejected where the prompt ends (``prlhf.scoring``).
Saving and loading live in ``prlhf.persistence``; the plain full-logits computations that check
all of this live in the tests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from .base_models import load_model_and_tokenizer, resolve_device
from .collate import PreferenceCollator, collate_sequences
from .config.training import PersonalizationConfig
from .data import TokenizeSettings, tokenize_prompt, with_user_id
from .layout import build_sequence, check_can_generate, shares_prompt
from .persistence import CONFIG_NAME, load_personalized, load_weights_into, push_personalized, save_personalized
from .scoring import cache_kwarg, position_ids_from_mask, score_targets, sum_per_sequence
from .user_models import ImplicitUserModel, build_user_model, encode_user_text
from .users import UserRegistry

logger = logging.getLogger(__name__)


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
              lora_kwargs: dict | None = None, trust_remote_code: bool = False,
              load_kwargs: dict | None = None) -> "PersonalizedLM":
        """A fresh user model around ``config.base_model_name_or_path`` (or the given ``llm``);
        ``load_kwargs`` (dtype, attn_implementation, ...) go to the model loader."""
        if llm is None:
            llm, tokenizer = load_model_and_tokenizer(config.base_model_name_or_path, trust_remote_code=trust_remote_code,
                                                      **(load_kwargs or {}))
        table = llm.get_input_embeddings().weight
        user_model = build_user_model(
            config.user_model, registry.n_rows, config.n_user_tokens, table.shape[1], config.n_clusters,
            config.cluster_weighting, config.user_init, table, config.seed, config.user_offset_init,
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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Recompute the LLM's layer activations in the backward pass (``Trainer`` calls this for
        ``gradient_checkpointing=True``); extra arguments (``every_n_layers``, ``offload``) go to the LLM."""
        llm = self.llm.get_base_model() if self.is_lora else self.llm
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        if self.is_lora:
            self.llm.enable_input_require_grads()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        llm = self.llm.get_base_model() if self.is_lora else self.llm
        if hasattr(llm, "activation_checkpointing_disable"):
            llm.activation_checkpointing_disable()
        else:
            llm.gradient_checkpointing_disable()

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.llm.modules())

    # -- forward ------------------------------------------------------------------------------

    @property
    def _no_split_modules(self) -> list[str]:
        """The LLM's decoder-layer classes: what FSDP's transformer auto-wrap (accelerate) makes a
        unit each; the user model and embeddings stay in the root unit."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return list(getattr(base, "_no_split_modules", None) or [])

    @property
    def n_implicit_tokens(self) -> int:
        return self.prlhf_config.n_implicit_tokens if self.user_model is not None else 0

    def embed(self, input_ids: torch.Tensor, implicit_mask: torch.Tensor | None, user_rows: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (N, T, d) with the implicit user embedding scattered into the slots;
        ``user_rows`` (N,), or (N, n) for rows holding n users' slots one after another."""
        embeds = self.llm.get_input_embeddings()(input_ids)  # (N, T, d)
        if self.user_model is None or implicit_mask is None or not bool(implicit_mask.any()):
            return embeds
        if user_rows.dim() == 2:  # several terms per row: their slots in order
            users = torch.cat([self.user_model(user_rows[:, k]) for k in range(user_rows.shape[1])], dim=1)
        else:
            users = self.user_model(user_rows)  # (N, T_u, d)
        return embeds.masked_scatter(implicit_mask.unsqueeze(-1), users.to(embeds.dtype))

    def forward(self, input_ids=None, attention_mask=None, implicit_mask=None, user_rows=None, pairs=None, terms=None,
                full_logits: bool = False, **kwargs):
        """Logits (N, T, V) of sequences laid out by the collator, for users ``user_rows`` (N,).

        With ``pairs`` (a collated preference batch) and ``terms``: ``term_logps(pairs, terms)``,
        so that a distributed wrapper sees one forward call per step."""
        if pairs is not None:
            return self.term_logps(pairs, terms, full_logits=full_logits)
        embeds = self.embed(input_ids, implicit_mask, user_rows)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **kwargs,
        ).logits

    def term_logps(self, batch: dict, terms: list, full_logits: bool = False) -> torch.Tensor:
        """log pi_P(y | x, u) of chosen and rejected for several user terms in ONE forward pass.

        ``batch`` is a collated preference batch (plain or packed); ``terms`` a list of
        ``(pair_users (B,), pairs (B,) bool or None)``: each term scores the selected pairs (all
        with None) under the given user rows. Returns (n_terms, 2B): chosen of pair i at column i,
        rejected at B + i; pairs a term did not select are 0."""
        R, T = batch["input_ids"].shape
        B = batch["user_rows"].shape[0]
        row_pair, t_row, t_col = batch["row_pair"], batch["target_row"], batch["target_col"]
        if "n_terms" in batch:  # before_response packing: every term's user and responses in the pair's one row
            n = int(batch["n_terms"])
            if len(terms) != n:
                raise ValueError(f"this batch packs {n} terms per row, {len(terms)} were asked for")
            users = torch.stack([pair_users[row_pair] for pair_users, _ in terms], dim=1)  # (R, n)
            embeds = self.embed(batch["input_ids"], batch["implicit_mask"], users)
            token_logps = score_targets(self.llm, embeds, batch, t_row * T + t_col, batch["target_ids"],
                                        full_logits=full_logits)
            out = sum_per_sequence(token_logps, batch["target_seq"], n * 2 * B).view(n, 2 * B)
            chosen = torch.stack([torch.ones(B, dtype=torch.bool, device=out.device) if sel is None else sel
                                  for _, sel in terms])  # pairs a term did not select are 0
            return out * chosen.repeat(1, 2).to(out.dtype)
        all_pairs = torch.ones(B, dtype=torch.bool, device=row_pair.device)
        rows, users, flat, seqs, ids = [], [], [], [], []
        for k, (pair_users, selected) in enumerate(terms):
            row_sel = (all_pairs if selected is None else selected)[row_pair]  # (R,)
            term_rows = row_sel.nonzero(as_tuple=True)[0]
            new_row = torch.full((R,), -1, dtype=torch.long, device=row_pair.device)  # row in the stacked input
            new_row[term_rows] = torch.arange(len(term_rows), device=row_pair.device) + sum(len(r) for r in rows)
            keep = row_sel[t_row]
            flat.append(new_row[t_row[keep]] * T + t_col[keep])
            seqs.append(batch["target_seq"][keep] + k * 2 * B)
            ids.append(batch["target_ids"][keep])
            rows.append(term_rows)
            users.append(pair_users[row_pair[term_rows]])
        rows = torch.cat(rows)
        sub = {key: batch[key][rows] for key in ("input_ids", "attention_mask", "implicit_mask", "user_mask", "branch", "parent")
               if key in batch}
        embeds = self.embed(sub["input_ids"], sub["implicit_mask"], torch.cat(users))
        token_logps = score_targets(self.llm, embeds, sub, torch.cat(flat), torch.cat(ids), full_logits=full_logits)
        # a fresh tensor, not a view: under FSDP2 a module's output view would lose the pre-backward hook to any
        # in-place op on it (torch warns); (n_terms, 2B) floats, so the copy costs nothing
        return sum_per_sequence(token_logps, torch.cat(seqs), len(terms) * 2 * B).view(len(terms), 2 * B).clone()

    def collator(self, padding_side: str = "right", packing: bool = False, n_terms: int = 1,
                 with_user: bool = True) -> PreferenceCollator:
        """The collator of this model's preference batches (its user tokens and their position)."""
        tok = self.tokenizer
        return PreferenceCollator(tok.pad_token_id, tok.bos_token_id, self.n_implicit_tokens if with_user else 0,
                                  padding_side, packing=packing, with_user=with_user,
                                  user_position=self.prlhf_config.user_position, n_terms=n_terms)

    def tokenize_settings(self, max_length: int | None, max_prompt_length: int | None):
        """How this model's training and evaluation data are tokenized."""
        cfg = self.prlhf_config
        return TokenizeSettings(max_length, max_prompt_length, cfg.max_user_text_tokens, self.n_implicit_tokens,
                                cfg.user_id_prompt)

    # -- generation ---------------------------------------------------------------------------

    def user_rows_for(self, user_ids) -> torch.Tensor:
        return torch.tensor([self.registry.row(u) for u in user_ids], dtype=torch.long, device=self.device)

    def prepare_prompts(self, prompts: list, user_ids: list, user_texts: list | None = None,
                        share_prompts: bool | None = False) -> dict:
        """Left-padded generation inputs: ``[BOS] [slots] [user text] [prompt]`` per row (``prefix``),
        ``[BOS] [prompt] [slots] [user text]`` with ``before_response``.

        A user's text comes from ``user_texts`` when given, else from the registry (training data).
        ``share_prompts`` (``before_response`` with user tokens; None: when some prompt repeats):
        rows are laid out as ``[their prompt, left-padded to the longest distinct prompt] [their user
        part, left-padded]``, with ``prompt_rows`` (N,) the index of each row's distinct prompt and
        ``prompt_width`` the prompt columns, so that the KV cache of each distinct prompt is computed
        once for all its users (``prefill_prompts``). Positions follow the attention mask, so a row's
        logits are those of the plain layout."""
        tok, cfg = self.tokenizer, self.prlhf_config
        check_can_generate(cfg.user_position)
        seqs = []
        for i, (prompt, uid) in enumerate(zip(prompts, user_ids)):
            text = user_texts[i] if user_texts is not None else None
            if not text and uid is not None:
                text = self.registry.user_texts.get(str(uid))
            text_ids = encode_user_text(tok, text, cfg.max_user_text_tokens)
            prompt_ids = tokenize_prompt(tok, with_user_id(prompt, uid, cfg.user_id_prompt))
            seqs.append(build_sequence(prompt_ids, [], text_ids, self.n_implicit_tokens, tok.bos_token_id, tok.pad_token_id,
                                       cfg.user_position))
        can = shares_prompt(cfg.user_position) and self.n_implicit_tokens > 0
        if share_prompts and not can:
            raise ValueError("a prompt's KV cache can be shared across users only with user_position 'before_response' "
                             "and a user model with user tokens")
        # every row's user part starts at its first user token; what comes before is its prompt
        prompt_keys = [tuple(seq[0][:seq[3].index(True)]) for seq in seqs] if can else []
        if share_prompts is None:
            share_prompts = can and len(set(prompt_keys)) < len(seqs)
        batch = self._collate_shared(seqs, prompt_keys) if share_prompts else collate_sequences(seqs, tok.pad_token_id, "left")
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["user_rows"] = self.user_rows_for(user_ids)
        return batch

    def _collate_shared(self, seqs: list[tuple], prompt_keys: list[tuple]) -> dict:
        """``[distinct prompt][user part]`` rows, each part left-padded on its own (see ``prepare_prompts``)."""
        pad = self.tokenizer.pad_token_id
        distinct: dict[tuple, int] = {}
        prompt_rows, prompt_parts, user_parts = [], [], []
        for seq, key in zip(seqs, prompt_keys):
            at = len(key)
            if key not in distinct:
                distinct[key] = len(distinct)
                prompt_parts.append(tuple(part[:at] for part in seq))
            prompt_rows.append(distinct[key])
            user_parts.append(tuple(part[at:] for part in seq))
        prompts = collate_sequences(prompt_parts, pad, "left")
        users = collate_sequences(user_parts, pad, "left")
        rows = torch.tensor(prompt_rows)
        batch = {k: torch.cat([prompts[k][rows], users[k]], dim=1) for k in users}
        batch.update(prompt_rows=rows, prompt_width=prompts["input_ids"].shape[1])
        return batch

    def prefill_prompts(self, batch: dict, embeds: torch.Tensor):
        """The KV cache of a ``share_prompts`` batch's prompt columns: each distinct prompt run once,
        then its cache rows repeated for its users. Returns the cache (a transformers ``Cache``)."""
        rows, width = batch["prompt_rows"], batch["prompt_width"]
        first = torch.tensor([int((rows == k).nonzero()[0]) for k in range(int(rows.max()) + 1)], device=rows.device)
        mask = batch["attention_mask"][first, :width]
        out = self.llm(inputs_embeds=embeds[first, :width], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=True, logits_to_keep=1)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        cache.batch_select_indices(rows)
        return cache

    @torch.no_grad()
    def prompt_embeds(self, prompt, user_id: str | None = None, user_text: str | None = None) -> torch.Tensor:
        """The input embeddings (T, d) our generation feeds the LLM for one user and prompt, unpadded:
        ``[BOS] [user embedding] [user text] [prompt]``. For serving engines that take embeddings
        instead of token ids (vLLM >= 0.11 with ``--enable-prompt-embeds``: ``{"prompt_embeds": t}``),
        where positions start at 0 as here; a LoRA model's adapters must be merged into the
        weights that engine loads (``merged_llm``)."""
        batch = self.prepare_prompts([prompt], [user_id], [user_text] if user_text is not None else None)
        embeds = self.embed(batch["input_ids"], batch["implicit_mask"], batch["user_rows"])[0]
        return embeds[batch["attention_mask"][0].bool()].detach()

    def merged_llm(self):
        """The LLM with LoRA adapters merged in (a plain ``PreTrainedModel`` to save for another
        engine); the LLM itself when there are no adapters. This model is left unchanged."""
        import copy

        if not self.is_lora:
            return self.llm
        return copy.deepcopy(self.llm).merge_and_unload()

    @torch.no_grad()
    def generate(self, prompts: list, user_ids: list | None = None, user_texts: list | None = None,
                 skip_special_tokens: bool = True, share_prompt_cache: bool | None = None, **generate_kwargs) -> list[str]:
        """Responses for a batch of prompts, each for its own user (``None``/unknown: the generic
        user), in one ``generate()`` call with the KV cache. With ``user_position: before_response``
        a prompt asked for several users is run once and its KV cache shared (``share_prompt_cache``:
        None when a prompt repeats, False never, True always: an error where the layout cannot)."""
        user_ids = list(user_ids) if user_ids is not None else [None] * len(prompts)
        if len(user_ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(user_ids)} user ids")
        if generate_kwargs.get("num_return_sequences", 1) > 1 or generate_kwargs.get("num_beams", 1) > 1:
            share_prompt_cache = False  # generate() would expand the rows but not a cache given to it
        batch = self.prepare_prompts(prompts, user_ids, user_texts, share_prompt_cache)
        ids = self.generate_ids(batch, **generate_kwargs)
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
            if "prompt_rows" in batch:  # the prompts' cache computed once; generate() runs the user parts on it
                generate_kwargs[cache_kwarg(self.llm)] = self.prefill_prompts(batch, embeds)
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], **generate_kwargs)
        finally:
            self.train(was_training)
        return out  # decoder-only generate with inputs_embeds returns only the new tokens

    # -- save / load (prlhf.persistence) -------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None,
                        extra_files: dict[str, str] | None = None, card_training: dict | None = None,
                        card_metrics: dict | None = None, extra_tensors: dict | None = None,
                        card_kind: str = "policy") -> None:
        """Write the whole model folder atomically, with the model card and ``manifest.json``;
        non-finite weights are refused (see ``prlhf.persistence.save_personalized``)."""
        save_personalized(self, save_directory, state_dict, extra_files, card_training, card_metrics, extra_tensors,
                          card_kind)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, trust_remote_code: bool = False,
                        is_trainable: bool = False, device: str | torch.device | None = None,
                        **load_kwargs) -> "PersonalizedLM":
        """Restore a saved model from a local folder or a Hub repository, verified against its
        manifest (see ``prlhf.persistence.load_personalized``)."""
        return load_personalized(cls, directory, trust_remote_code, is_trainable, device, **load_kwargs)

    @classmethod
    def from_pretrained_or_plain(cls, name_or_path: str | os.PathLike, trust_remote_code: bool = False,
                                 device: str | torch.device | None = None, **load_kwargs) -> "PersonalizedLM":
        """A personalized model folder (``prlhf_config.json``) as ``from_pretrained`` loads it, or any
        other causal LM (a folder, a Hub id, ``tiny-llama``, ``smollm2-135m-instruct``) wrapped without
        a user model: every user is served alike."""
        if (Path(name_or_path) / CONFIG_NAME).is_file():
            return cls.from_pretrained(name_or_path, trust_remote_code, device=device, **load_kwargs)
        llm, tok = load_model_and_tokenizer(str(name_or_path), trust_remote_code=trust_remote_code, **load_kwargs)
        model = cls(llm, tok, UserRegistry(), PersonalizationConfig(str(name_or_path), user_model="none"), None)
        if device is not None:
            model.to(resolve_device(device))
        model.eval()
        return model

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload personalized model (prlhf)", revision: str | None = None,
                    api=None) -> str:
        """Save and upload with ``huggingface_hub`` (see ``prlhf.persistence.push_personalized``)."""
        return push_personalized(self, repo_id, private, token, commit_message, revision, api)

    def load_weights_from(self, directory: str | os.PathLike) -> None:
        """Load a checkpoint's weights into this model in place (used to resume training)."""
        load_weights_into(self, directory)
