"""Training configs as dataclasses extending ``transformers.TrainingArguments`` (TRL-style, flat
keys): SFT, P-DPO, P-RM, and ``PersonalizationConfig``, what a saved model records.

The same object is the Python API, the YAML recipe (``prlhf train --config recipe.yaml``) and the
command-line flags (``--beta 0.1``): every field carries its help text in ``metadata``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from transformers import TrainingArguments

from ..base_models import DTYPES, portable_path
from ..layout import check_user_position
from ..losses import LOSS_TYPES
from ..storage import check_output_path
from ..user_models import CLUSTER_WEIGHTINGS, OFFSET_INITS, USER_INITS, USER_MODELS
from .option import option

USER_ROWS_UPDATES = ("auto", "dense", "lazy")
USER_LEARNING_RATE = 3e-2  # default user-model learning rate of P-DPO (measured on SmolLM2, TL;DR and DSP)
LORA_LEARNING_RATE = 5e-4  # default LLM learning rate with use_lora (measured on SmolLM2)
FULL_LEARNING_RATE = 5e-6  # default LLM learning rate for full fine-tuning
HEALTH_EVAL_STEPS = 0.25  # health evaluation every quarter of the run when eval_steps is not set
LAZY_ROWS_FROM = 1000  # user_rows_update auto: lazy from this many users


@dataclass
class PersonalizationConfig:
    """What a saved personalized model needs to be rebuilt (written as ``prlhf_config.json``)."""

    base_model_name_or_path: str
    user_model: str = "individual"
    n_user_tokens: int = 10
    n_clusters: int = 10
    cluster_weighting: str = "softmax"
    user_init: str = "vocab"
    user_offset_init: str = "zero"
    max_user_text_tokens: int = 128
    use_lora: bool = False
    reference_model_name_or_path: str | None = None  # pi_SFT; None with LoRA: the base, adapters disabled
    user_id_prompt: str | None = None  # baseline: user id written into the prompt (see data.with_user_id)
    seed: int = 0
    user_position: str = "prefix"  # where the user tokens go: after BOS (the paper's) or before the response
    extra: dict = field(default_factory=dict)

    @property
    def n_implicit_tokens(self) -> int:
        return 0 if self.user_model == "none" else self.n_user_tokens


@dataclass
class PrlhfArguments(TrainingArguments):
    """Model, data and LoRA settings shared by SFT and P-DPO."""

    model_name_or_path: str = option("tiny-llama", "Base causal LM: a hub id, a local folder, or the offline aliases "
                                 "'tiny-llama' and 'smollm2-135m-instruct'.")
    train_file: str | None = option(None, "Training preference pairs (JSONL or JSON list of canonical records).")
    eval_file: str | None = option(None, "Evaluation preference pairs, same format.")
    max_length: int | None = option(512, "Maximum prompt + response tokens per sequence; responses are truncated to fit. "
                                "The user prefix (T_u vectors and the user's text) comes on top, so every user model "
                                "(and vanilla DPO) scores the same response tokens.")
    max_prompt_length: int | None = option(256, "Maximum prompt tokens (BOS included); longer prompts keep their end.")
    padding_side: str = option("right", "Padding side of training batches ('right' or 'left'); log-probs do not depend on it.")
    use_lora: bool = option(False, "Train LoRA adapters instead of all LLM weights; the reference is then the base "
                        "model with adapters disabled (no second copy of the weights).")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA scaling alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: str = option("all-linear", "Modules that get LoRA adapters: 'all-linear' or a comma-separated list "
                                  "of module names (e.g. 'q_proj,v_proj').")
    trust_remote_code: bool = option(False, "Allow model code from the hub (off unless you ask for it).")
    model_dtype: str = option("float32", "dtype the base model (and reference) are loaded in: 'float32', 'bfloat16', "
                          "'float16' or 'auto' (the checkpoint's own). Mixed-precision training itself is bf16/fp16.")
    attn_implementation: str | None = option(None, "Attention implementation to load the model with ('sdpa', 'eager', "
                                         "'flash_attention_2', ...); default: transformers' choice.")

    # TRL-like defaults that differ from TrainingArguments'
    output_dir: str | None = option("outputs/prlhf", "Where checkpoints and the final model go.")
    remove_unused_columns: bool = option(False, "Kept False: prlhf never drops the user columns.")
    logging_steps: float = option(10, "Log every N steps.")
    learning_rate: float = option(1e-5, "Learning rate of the LLM (AdamW).")

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.model_dtype not in DTYPES:
            raise ValueError(f"model_dtype must be one of {sorted(DTYPES)}, got {self.model_dtype!r}")
        for f in fields(self):
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate must be >= 0, got {self.learning_rate}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1 token, got {self.max_prompt_length}")
        self._refuse_overwriting(self.model_name_or_path, "model_name_or_path")
        if self.output_dir:
            check_output_path(self.output_dir, "output_dir")
            if Path(self.output_dir).is_file():
                raise NotADirectoryError(f"output_dir {self.output_dir}: is a file, not a folder")
        super().__post_init__()

    def _refuse_overwriting(self, source: str | None, key: str) -> None:
        """``output_dir`` must not be a model that training reads (it would be overwritten)."""
        if source and self.output_dir and Path(source).exists() and Path(source).resolve() == Path(self.output_dir).resolve():
            raise ValueError(f"output_dir {self.output_dir!r} is the {key} folder: saving would overwrite the model "
                             "training starts from (and the reference, pi_SFT); choose another output_dir")

    def load_kwargs(self) -> dict:
        """Keyword arguments for loading the base and reference models."""
        return {"dtype": self.model_dtype, "attn_implementation": self.attn_implementation}

    def lora_kwargs(self) -> dict:
        targets = self.lora_target_modules
        if targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "target_modules": targets}


@dataclass
class PSFTConfig(PrlhfArguments):
    """Supervised fine-tuning on prompt -> chosen, without any user input: builds pi_SFT."""

    learning_rate: float = option(2e-5, "Learning rate (AdamW).")
    response_logits_only: bool = option(True, "Apply the LM head at response positions only (the loss is the same); "
                                    "False computes logits at every position, as most SFT trainers do.")


@dataclass
class PDPOConfig(PrlhfArguments):
    """P-DPO: the LLM and the user model trained jointly on per-user preference pairs."""

    reward_layouts: ClassVar[bool] = False  # user_position: the policy layouts (PRMConfig adds after_response)

    user_model: str = option("individual", f"Implicit user model: one of {USER_MODELS}. 'none' (and 'uniform') is vanilla DPO.")
    n_user_tokens: int = option(10, "T_u: number of implicit user-embedding tokens (1 to 64); sets the user model's capacity.")
    n_clusters: int = option(10, "K: number of cluster embeddings of the 'cluster' user model.")
    cluster_weighting: str = option("softmax", f"How cluster weights are normalised: one of {CLUSTER_WEIGHTINGS} "
                                "('softmax': convex mix; 'linear': unnormalised low-rank factors).")
    user_init: str = option("vocab", f"User-embedding initialisation: one of {USER_INITS} ('vocab': copies of random "
                        "token embeddings, as the authors' code; 'random': small Gaussian).")
    user_offset_init: str = option("vocab", f"Initial per-user offsets o_u of the individual user model: one of {OFFSET_INITS} "
                               "('vocab': copies of random token embeddings, as the authors' code, so users differ from "
                               "the first step; 'zero': every user starts as the generic user; 'random': Gaussian at the "
                               "token embeddings' scale). Measured (SmolLM2, TL;DR): zero offsets lost the minority (its "
                               "training accuracy 0.00-0.14 at step 20), vocab gave flip rate 0.22 after 40 steps.")
    max_user_text_tokens: int = option(128, "Explicit user model: tokens of the user's text kept (0 disables it).")
    user_learning_rate: float | None = option(USER_LEARNING_RATE, "Learning rate of the user model, its own (None: "
                                              "learning_rate). Measured (SmolLM2, LoRA at 5e-4, 60 steps, TL;DR tuning "
                                              "half, seeds 42 / 1): 3e-2 gave the minority a flip rate of 0.65 / 0.58 and "
                                              "seen accuracy +0.16 / +0.13 over vanilla DPO, 1e-2 0.35 / 0.12 and +0.00 / "
                                              "-0.04; at the LLM's rate the soft prompts barely move.")
    user_rows_update: str = option("auto", "How the per-user rows (individual offsets, cluster mixture logits) are "
                               "optimized: 'dense' (AdamW over the whole table every step: the step's cost grows with "
                               "the number of users), 'lazy' (sparse gradients; Adam moments and updates for the batch's "
                               "rows only, as TF's LazyAdam with AdamW's arithmetic: the cost is flat in the number of users, "
                               "and rows absent from a batch stay put; one process only), 'auto' (lazy from 1,000 users on, in "
                               "one process).")
    user_position: str = option("prefix", "Where the user tokens sit: 'prefix' (after BOS, before the prompt: the paper's "
                            "layout) or 'before_response' (between the prompt and the response: the prompt is the same "
                            "for every user, so with packing one row holds the prompt once and both P-DPO terms' user "
                            "tokens and responses behind it).")
    user_id_in_prompt: bool = option(False, "Baseline: write the user id into the prompt text (user_id_prompt) "
                                 "instead of, or besides, a user model; what people do with TRL today.")
    user_id_prompt: str = option("[user: {user_id}]\n", "Template of the user id written into the prompt.")
    alpha: float = option(0.5, "Weight of the user-specific term; 1 - alpha weighs the generic-user term that teaches e_0.")
    alpha_sampling: bool = option(False, "Score each training pair under ONE term, drawn per pair: the user's (probability "
                              "alpha) or the generic user's (1 - alpha). The loss is an unbiased estimate of the "
                              "alpha mix at half the forward/backward cost of running both terms (more steps per "
                              "hour, noisier gradients); evaluation always runs both terms.")
    beta: float = option(0.1, "DPO temperature beta: strength of the KL constraint to the reference.")
    loss_type: str = option("sigmoid", f"Preference loss: one of {LOSS_TYPES}.")
    label_smoothing: float = option(0.0, "Conservative-DPO label smoothing (sigmoid loss only).")
    sft_weight: float = option(0.0, "Weight of the chosen response's mean token NLL added to each term (RPO; TRL's "
                           "loss_type=['sigmoid', 'sft']). Keeps chosen responses likely, so generations follow the "
                           "learned preference; 0 is plain P-DPO.")
    reference_model_name_or_path: str | None = option(None, "pi_SFT, the reference: default model_name_or_path "
                                                  "(with LoRA: the base with adapters disabled).")
    packing: bool = option(True, "Shared-prompt packing: chosen and rejected of a pair in one sequence [user prefix, prompt, "
                       "chosen, rejected] with a 4D attention mask, so the prompt is processed once per pair. False: "
                       "one padded sequence per response (the plain reference layout).")
    precompute_ref_log_probs: bool = option(True, "Compute the reference log-probs once, before training, and cache them on "
                                        "disk (reference_cache_dir); False: a reference forward pass every step (with "
                                        "a full copy of the weights unless use_lora).")
    lazy_reference: bool = option(False, "With LoRA (the reference is the base, adapters disabled) and "
                              "precompute_ref_log_probs: compute each pair's reference log-probs the first time a step "
                              "visits it and keep them in memory, instead of all pairs before training: a run that "
                              "sees part of the data pays for that part only (no disk cache, so runs do not share it).")
    reference_cache_dir: str | None = option(None, "Where precomputed reference log-probs are cached, keyed by reference "
                                         "weights, tokenizer, tokenized data and dtype (default: $PRLHF_CACHE/"
                                         "reference_logps, i.e. ~/.cache/prlhf/reference_logps); 'none' keeps them in "
                                         "memory only.")
    response_logits_only: bool = option(True, "Apply the LM head at response positions only; False computes logits and "
                                    "log-softmax at every position (as the authors' code does).")
    disable_dropout: bool = option(True, "Disable dropout in the policy and the reference (as TRL does), so that "
                               "log-probs, rewards and the loss are deterministic.")
    log_per_user_max: int = option(20, "Log per-user training accuracy when there are at most this many users.")
    health_eval_pairs: int = option(32, "Health signal: with no eval_file, hold out this many pairs of the training users "
                                "(spread over the users) and evaluate them during training (eval_strategy 'steps' at "
                                "eval_steps, default every quarter of the run): seen and generic-user accuracy and the "
                                "user-swap flip rate, with a warning when the users are not separating. 0: off.")
    users_file: str | None = option(None, "users.json of the training data (user groups for the per-group flip rate of the "
                                "health signal); default: users.json beside train_file, when there is one.")
    learning_rate: float | None = option(None, f"Learning rate of the LLM (AdamW). Default: {LORA_LEARNING_RATE:g} with use_lora "
                                     f"(measured on SmolLM2 DSP and TL;DR, LoRA r 16), {FULL_LEARNING_RATE:g} for full "
                                     "fine-tuning.")
    lr_scheduler_type: str = option("constant", "Learning-rate schedule (transformers' names). Default constant: measured "
                                "(SmolLM2 TL;DR, 100 steps), linear decay left the users unseparated (flip rate 0.07, "
                                "P-DPO 0.125 below vanilla DPO) where a constant rate separated them (0.19, +0.17).")

    def __post_init__(self):
        if self.learning_rate is None:
            self.learning_rate = self.default_learning_rate()
        if self.health_eval_pairs < 0:
            raise ValueError(f"health_eval_pairs must be >= 0, got {self.health_eval_pairs}")
        if self.health_check_active() and str(getattr(self.eval_strategy, "value", self.eval_strategy)) == "no":
            # the health signal needs evaluations: every quarter of the run unless eval_steps says otherwise
            self.eval_strategy = "steps"
            if self.eval_steps is None:
                self.eval_steps = HEALTH_EVAL_STEPS
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
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) (0.5 and above train towards the rejected side), "
                             f"got {self.label_smoothing}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        check_user_position(self.user_position, reward=self.reward_layouts)
        if self.user_rows_update not in USER_ROWS_UPDATES:
            raise ValueError(f"user_rows_update must be one of {USER_ROWS_UPDATES}, got {self.user_rows_update!r}")
        if self.user_learning_rate is not None and self.user_learning_rate < 0:
            raise ValueError(f"user_learning_rate must be >= 0, got {self.user_learning_rate}")
        self._refuse_overwriting(self.reference_model_name_or_path, "reference_model_name_or_path")
        super().__post_init__()

    def default_learning_rate(self) -> float:
        """The LLM's learning rate when none is given: it follows ``use_lora``."""
        return LORA_LEARNING_RATE if self.use_lora else FULL_LEARNING_RATE

    def personalization_config(self) -> PersonalizationConfig:
        """What the model this run trains records about itself (``prlhf_config.json``)."""
        return PersonalizationConfig(
            base_model_name_or_path=portable_path(self.model_name_or_path),
            user_model=self.user_model,
            n_user_tokens=self.n_user_tokens,
            n_clusters=self.n_clusters,
            cluster_weighting=self.cluster_weighting,
            user_init=self.user_init,
            user_offset_init=self.user_offset_init,
            max_user_text_tokens=self.max_user_text_tokens,
            use_lora=self.use_lora,
            user_id_prompt=self.user_id_prompt if self.user_id_in_prompt else None,
            seed=self.seed,
            user_position=self.user_position,
        )

    def health_check_active(self) -> bool:
        """Whether training holds out ``health_eval_pairs`` of its pairs for the health signal: no
        eval_file, and a user model that can tell users apart."""
        return self.health_eval_pairs > 0 and not self.eval_file and self.user_model in ("individual", "cluster")

    def effective_settings(self) -> dict:
        """The settings that decide whether a run personalizes, as this run uses them (logged at
        start, written to the model card)."""
        keys = ("user_model", "n_user_tokens", "user_offset_init", "learning_rate", "user_learning_rate",
                "lr_scheduler_type", "warmup_steps", "alpha", "alpha_sampling", "beta", "sft_weight", "use_lora",
                "user_position", "health_eval_pairs")
        out = {}
        for k in keys:
            v = getattr(self, k, None)
            out[k] = getattr(v, "value", v)
        return out


PRM_FULL_LEARNING_RATE = 1e-5  # default backbone learning rate of full fine-tuning
PRM_USER_LEARNING_RATE = 1e-2  # default user-model learning rate of P-RM (measured on SmolLM2 DSP)


@dataclass
class PRMConfig(PDPOConfig):
    """P-RM training: the keys of ``PDPOConfig`` where they mean the same (user model, alpha and
    alpha_sampling, LoRA, lengths, learning rates); beta, loss_type, label_smoothing, sft_weight
    and the reference keys are not used by a reward model."""

    reward_layouts: ClassVar[bool] = True  # after_response, where a reward head reads the user

    center_rewards_coefficient: float = option(0.0, "Centring penalty coefficient on (r_w + r_l)^2 per term, as TRL's "
                                           "RewardTrainer (0: off).")
    learning_rate: float | None = option(None, f"Learning rate of the backbone and the reward head (AdamW). Default: "
                                     f"{LORA_LEARNING_RATE:g} with use_lora (the DSP P-RM recipe's, measured 0.829), "
                                     f"{PRM_FULL_LEARNING_RATE:g} for full fine-tuning.")

    user_learning_rate: float | None = option(PRM_USER_LEARNING_RATE, "Learning rate of the user model, its own (None: "
                                              "learning_rate). P-RM: 1e-2, the P-RM recipe's (DSP report half: flip rate "
                                              "0.52, seen 0.32 above the generic user).")
    user_position: str = option("after_response", "Where the user tokens sit: 'after_response' (the last token is the "
                            "user's: the reward head reads the user's query over the whole response), 'prefix' (after "
                            "BOS: the paper's layout) or 'before_response'. Measured (SmolLM2 DSP P-RM): after_response "
                            "0.829 held-out accuracy, prefix 0.500 (the head on the response's last token never picked "
                            "up the user).")

    def default_learning_rate(self) -> float:
        return LORA_LEARNING_RATE if self.use_lora else PRM_FULL_LEARNING_RATE

    def effective_settings(self) -> dict:
        settings = super().effective_settings()
        for unused in ("beta", "sft_weight"):  # not part of a reward model's objective
            settings.pop(unused, None)
        return settings

    def __post_init__(self):
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        super().__post_init__()
