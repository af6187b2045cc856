"""Configs as dataclasses extending ``transformers.TrainingArguments`` (TRL-style, flat keys).

The same object is the Python API, the YAML recipe (``prlhf train --config recipe.yaml``) and the
command-line flags (``--beta 0.1``): every field carries its help text in ``metadata``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .losses import LOSS_TYPES
from .user_models import CLUSTER_WEIGHTINGS, OFFSET_INITS, USER_INITS, USER_MODELS


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PrlhfArguments(TrainingArguments):
    """Model, data and LoRA settings shared by SFT and P-DPO."""

    model_name_or_path: str = _f("tiny-llama", "Base causal LM: a hub id, a local folder, or the offline aliases "
                                 "'tiny-llama' and 'smollm2-135m-instruct'.")
    train_file: str | None = _f(None, "Training preference pairs (JSONL or JSON list of canonical records).")
    eval_file: str | None = _f(None, "Evaluation preference pairs, same format.")
    max_length: int | None = _f(512, "Maximum prompt + response tokens per sequence; responses are truncated to fit. "
                                "The user prefix (T_u vectors and the user's text) comes on top, so every user model "
                                "(and vanilla DPO) scores the same response tokens.")
    max_prompt_length: int | None = _f(256, "Maximum prompt tokens (BOS included); longer prompts keep their end.")
    padding_side: str = _f("right", "Padding side of training batches ('right' or 'left'); log-probs do not depend on it.")
    use_lora: bool = _f(False, "Train LoRA adapters instead of all LLM weights; the reference is then the base "
                        "model with adapters disabled (no second copy of the weights).")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: str = _f("all-linear", "Modules that get LoRA adapters: 'all-linear' or a comma-separated list "
                                  "of module names (e.g. 'q_proj,v_proj').")
    trust_remote_code: bool = _f(False, "Allow model code from the hub (off unless you ask for it).")

    # TRL-like defaults that differ from TrainingArguments'
    output_dir: str | None = _f("outputs/prlhf", "Where checkpoints and the final model go.")
    remove_unused_columns: bool = _f(False, "Kept False: prlhf never drops the user columns.")
    logging_steps: float = _f(10, "Log every N steps.")
    learning_rate: float = _f(1e-5, "Learning rate of the LLM (AdamW).")

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        super().__post_init__()

    def lora_kwargs(self) -> dict:
        targets = self.lora_target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "target_modules": targets}


@dataclass
class PSFTConfig(PrlhfArguments):
    """Supervised fine-tuning on prompt -> chosen, without any user input: builds pi_SFT."""

    learning_rate: float = _f(2e-5, "Learning rate (AdamW).")


@dataclass
class PDPOConfig(PrlhfArguments):
    """P-DPO: the LLM and the user model trained jointly on per-user preference pairs."""

    user_model: str = _f("individual", f"Implicit user model: one of {USER_MODELS}. 'none' (and 'uniform') is vanilla DPO.")
    n_user_tokens: int = _f(10, "T_u: number of implicit user-embedding tokens (1 to 64); sets the user model's capacity.")
    n_clusters: int = _f(10, "K: number of cluster embeddings of the 'cluster' user model.")
    cluster_weighting: str = _f("softmax", f"How cluster weights are normalised: one of {CLUSTER_WEIGHTINGS} "
                                "('softmax': convex mix; 'linear': unnormalised low-rank factors).")
    user_init: str = _f("vocab", f"User-embedding initialisation: one of {USER_INITS} ('vocab': copies of random "
                        "token embeddings, as the authors' code; 'random': small Gaussian).")
    user_offset_init: str = _f("zero", f"Initial per-user offsets o_u of the individual user model: one of {OFFSET_INITS} "
                               "('zero': every user starts as the generic user; 'vocab': copies of random token "
                               "embeddings, as the authors' code; 'random': Gaussian at the token embeddings' scale).")
    max_user_text_tokens: int = _f(128, "Explicit user model: tokens of the user's text kept (0 disables it).")
    user_learning_rate: float | None = _f(None, "Learning rate of the user model (default: learning_rate).")
    user_id_in_prompt: bool = _f(False, "Baseline: write the user id into the prompt text (user_id_prompt) "
                                 "instead of, or besides, a user model; what people do with TRL today.")
    user_id_prompt: str = _f("[user: {user_id}]\n", "Template of the user id written into the prompt.")
    alpha: float = _f(0.5, "Weight of the user-specific term; 1 - alpha weighs the generic-user term that teaches e_0.")
    beta: float = _f(0.1, "DPO temperature beta: strength of the KL constraint to the reference.")
    loss_type: str = _f("sigmoid", f"Preference loss: one of {LOSS_TYPES}.")
    label_smoothing: float = _f(0.0, "Conservative-DPO label smoothing (sigmoid loss only).")
    sft_weight: float = _f(0.0, "Weight of the chosen response's mean token NLL added to each term (RPO; TRL's "
                           "loss_type=['sigmoid', 'sft']). Keeps chosen responses likely, so generations follow the "
                           "learned preference; 0 is plain P-DPO.")
    reference_model_name_or_path: str | None = _f(None, "pi_SFT, the reference: default model_name_or_path "
                                                  "(with LoRA: the base with adapters disabled).")
    packing: bool = _f(True, "Shared-prompt packing: chosen and rejected of a pair in one sequence [user prefix, prompt, "
                       "chosen, rejected] with a 4D attention mask, so the prompt is processed once per pair. False: "
                       "one padded sequence per response (the plain reference layout).")
    precompute_ref_log_probs: bool = _f(True, "Compute the reference log-probs once, before training, and cache them on "
                                        "disk (reference_cache_dir); False: a reference forward pass every step (with "
                                        "a full copy of the weights unless use_lora).")
    reference_cache_dir: str | None = _f(None, "Where precomputed reference log-probs are cached, keyed by reference "
                                         "weights, tokenizer, tokenized data and dtype (default: $PRLHF_CACHE/"
                                         "reference_logps, i.e. ~/.cache/prlhf/reference_logps); 'none' keeps them in "
                                         "memory only.")
    response_logits_only: bool = _f(True, "Apply the LM head at response positions only; False computes logits and "
                                    "log-softmax at every position (as the authors' code does).")
    disable_dropout: bool = _f(True, "Disable dropout in the policy and the reference (as TRL does), so that "
                               "log-probs, rewards and the loss are deterministic.")
    log_per_user_max: int = _f(20, "Log per-user training accuracy when there are at most this many users.")
    learning_rate: float = _f(5e-6, "Learning rate of the LLM (AdamW).")

    def __post_init__(self):
        if self.user_model not in USER_MODELS:
            raise ValueError(f"user_model must be one of {USER_MODELS}, got {self.user_model!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha}")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.user_offset_init not in OFFSET_INITS:
            raise ValueError(f"user_offset_init must be one of {OFFSET_INITS}, got {self.user_offset_init!r}")
        if self.user_model != "none" and not 1 <= self.n_user_tokens <= 64:
            raise ValueError(f"n_user_tokens must be between 1 and 64, got {self.n_user_tokens}")
        super().__post_init__()
