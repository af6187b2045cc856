"""Scoring response tokens fast, and knowing when the fast paths are exact.

``score_targets`` runs the backbone once over (possibly packed) rows and the LM head only at the
positions whose next token is scored; a packed row ``[prefix] [prompt] [chosen] [rejected]`` gets a
4D attention mask in which rejected does not see chosen (``packed_attention``) and position ids
that restart rejected where the prompt ends. ``packing_refusal`` says where packing cannot be exact
(stateful layers, ALiBi, sliding windows, attention without 4D masks); ``verify_fast_paths`` checks
packing and the response-only head against the plain layout with full logits at start-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_preference_data, tokenize_dataset


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens: the first real token is at 0 whatever the padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def packed_attention(branch: torch.Tensor, hidden_keys: torch.Tensor | None = None,
                     parent: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of packed rows: (allowed (R, T, T) bool, position_ids (R, T)).

    ``branch`` (R, T) is -1 for padding, 0 for the shared part, else the segment a token belongs to
    (1 chosen, 2 rejected; with several terms per row, each term's user prefix, chosen and
    rejected); ``parent`` (R, T) the segment each token also sees (its term's user prefix; 0: none).
    A query sees earlier keys of branch 0, of its own branch and of its parent; ``hidden_keys``
    (R, T) bool removes keys (the user positions, for the reference). Each token's position is the
    number of keys it sees minus one, which restarts every response where its context ends and
    skips removed keys. Every query also sees itself, so padding rows stay finite (their outputs
    are unused)."""
    T = branch.shape[1]
    q, k = branch.unsqueeze(2), branch.unsqueeze(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=branch.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    if parent is not None:
        allowed = allowed | (causal & (k == parent.unsqueeze(2)) & (k > 0))
    if hidden_keys is not None:
        allowed = allowed & ~hidden_keys.unsqueeze(1)
    positions = (allowed.sum(-1) - 1).clamp(min=0)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=branch.device)
    return allowed, positions


PACKING_ATTENTION = ("sdpa", "eager")


def _attn_impl(llm: nn.Module) -> str:
    return getattr(llm.config, "_attn_implementation", None) or "sdpa"


def packing_supported(llm: nn.Module) -> bool:
    """Whether the model's attention implementation takes a ready 4D mask (what packing needs)."""
    return _attn_impl(llm) in PACKING_ATTENTION


def check_packing_supported(llm: nn.Module) -> None:
    if not packing_supported(llm):
        raise ValueError(f"packed sequences need a 4D attention mask, which attn_implementation={_attn_impl(llm)!r} "
                         "does not take; load the model with attn_implementation='sdpa' or 'eager', or train with "
                         "packing=False")


def attention_mask_4d(llm: nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (R, T, T) in the form the model's attention implementation takes as a ready 4D mask."""
    check_packing_supported(llm)
    if _attn_impl(llm) == "sdpa":
        return allowed.unsqueeze(1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)  # eager: an additive float mask
    return mask.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that a model applies to its LM-head output (1.0 and None for most models)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None) or getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None):
        scale = 1.0 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(cfg, "final_logit_softcapping", None)


def backbone_and_head(llm: nn.Module):
    """(decoder, LM head) of a causal LM, or None when the model does not expose them."""
    try:
        decoder, head = llm.get_decoder(), llm.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is llm:
        return None
    return decoder, head


def score_targets(llm: nn.Module, embeds: torch.Tensor, batch: dict, target_index: torch.Tensor,
                  target_ids: torch.Tensor, hide_user: bool = False, full_logits: bool = False) -> torch.Tensor:
    """log p(target token) at each flat position ``target_index`` (into R*T) of the rows ``embeds``.

    ``batch`` gives the rows' ``attention_mask`` and ``user_mask``, and ``branch`` when packed;
    ``hide_user`` masks the user positions out (the reference). The LM head runs only at the target
    positions unless ``full_logits`` (logits and log-softmax at every position, as most trainers do)."""
    if "branch" in batch:
        allowed, position_ids = packed_attention(batch["branch"], batch["user_mask"] if hide_user else None,
                                                 batch.get("parent"))
        attention_mask = attention_mask_4d(llm, allowed, embeds.dtype)
    else:
        attention_mask = batch["attention_mask"]
        if hide_user:
            attention_mask = attention_mask * (~batch["user_mask"]).long()
        position_ids = position_ids_from_mask(attention_mask)
    parts = None if full_logits else backbone_and_head(llm)
    kwargs = dict(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if parts is None:
        logits = llm(**kwargs).logits
        logps = logits.float().log_softmax(-1).flatten(0, 1)[target_index]  # (M, V)
        return logps.gather(1, target_ids.unsqueeze(1)).squeeze(1)
    decoder, head = parts
    hidden = decoder(**kwargs).last_hidden_state  # (R, T, d)
    logits = head(hidden.flatten(0, 1)[target_index]).float()  # (M, V): response positions only
    scale, softcap = _logit_transform(llm.config)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, target_ids, reduction="none")


def sum_per_sequence(token_logps: torch.Tensor, target_seq: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """Summed token log-probs per sequence (n_sequences,) from per-target values and their sequence ids."""
    out = torch.zeros(n_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, target_seq, token_logps)


# model types whose layers carry state across positions (SSM / linear attention / recurrence):
# chosen would leak into rejected in a packed sequence
STATEFUL_MODEL_TYPES = ("mamba", "mamba2", "jamba", "zamba", "zamba2", "bamba", "falcon_h1", "falcon_mamba",
                        "granitemoehybrid", "qwen3_next", "lfm2", "lfm2_moe", "nemotron_h", "rwkv", "recurrent_gemma",
                        "xlstm", "minimax", "kimi_linear")
STATEFUL_LAYER_TYPES = ("linear_attention", "mamba", "conv", "recurrent", "ssm", "mlstm")


def _text_config(llm: nn.Module):
    cfg = llm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def packing_refusal(llm: nn.Module, max_packed_length: int | None = None) -> str | None:
    """Why shared-prompt packing cannot be exact for this model (None when nothing is known
    against it): stateful layers, ALiBi (ignores position ids), a sliding window shorter than the
    packed sequences (a ready 4D mask bypasses it), or an attention implementation without 4D masks."""
    cfg = _text_config(llm)
    kind = getattr(cfg, "model_type", "?")
    layer_types = [str(t) for t in (getattr(cfg, "layer_types", None) or [])]
    if kind in STATEFUL_MODEL_TYPES or any(t in STATEFUL_LAYER_TYPES for t in layer_types):
        return (f"packing=True: {kind} has layers that carry state across positions, so chosen would leak into "
                "rejected in a packed sequence; train with packing=False")
    if getattr(cfg, "alibi", False) or kind in ("bloom", "mpt"):
        return (f"packing=True: {kind} uses ALiBi, which ignores position ids, so the rejected response cannot "
                "restart where the prompt ends; train with packing=False")
    window = getattr(cfg, "sliding_window", None)
    uses_window = window is not None and (getattr(cfg, "use_sliding_window", True) is not False)
    if uses_window and max_packed_length is not None and max_packed_length > window:
        return (f"packing=True: the model's sliding_window ({window}) is shorter than the packed sequences (up to "
                f"{max_packed_length} tokens) and a ready 4D attention mask bypasses the window; train with "
                "packing=False (or sequences of at most the window)")
    if not packing_supported(llm):
        return (f"packing=True: attn_implementation={_attn_impl(llm)!r} takes no 4D attention mask; load the model "
                "with attn_implementation='sdpa' or 'eager', or train with packing=False")
    return None


def verify_fast_paths(model: nn.Module, data: list[dict], packing: bool = True, fast_head: bool = True,
                      atol: float = 1e-3, n_pairs: int = 2) -> str | None:
    """Check packing and the response-only LM head against the plain layout with full logits on a
    few pairs of ``data`` (records or tokenized examples) at start-up. Returns what is wrong, naming
    the setting to turn off, or None when both agree (or are off). ``model``: a ``PersonalizedLM``."""

    if not data or not (packing or fast_head):
        return None
    examples = list(data[:n_pairs])
    if "prompt_ids" not in examples[0]:
        examples = tokenize_dataset(load_preference_data(examples), model.tokenizer, model.tokenize_settings(None, None),
                                    model.registry)
    if packing:
        longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) + len(e.get("user_text_ids", []))
                      for e in examples) + model.n_implicit_tokens
        refusal = packing_refusal(model.llm, longest)
        if refusal:
            return refusal

    def logps(packed: bool, full_logits: bool) -> torch.Tensor:
        batch = model.collator(packing=packed)(examples)
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return model.term_logps(batch, [(batch["user_rows"], None)], full_logits=full_logits)[0].float().cpu()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain = logps(False, True)
            checks = ([("packing", logps(True, not fast_head))] if packing else []) + \
                     ([("response_logits_only", logps(False, False))] if fast_head else [])
    finally:
        model.train(was_training)
    kind = getattr(_text_config(model.llm), "model_type", "?")
    for setting, got in checks:
        diff = (got - plain).abs().max().item()
        if not diff <= atol:
            return (f"{setting}=True gives log-probs that differ from the plain layout with full logits by {diff:.3g} "
                    f"on this {kind} model (checked on {len(examples)} pairs at start-up); train with {setting}=False")
    return None


def cache_kwarg(llm) -> str:
    """The forward / generate argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    import inspect

    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
