"""Trainers: ``PDPOTrainer`` (P-DPO, Li et al. 2024) and ``PSFTTrainer`` (the SFT step that builds pi_SFT).

Both extend ``transformers.Trainer``: optimizer, schedule, gradient accumulation, logging,
checkpointing and ``accelerate launch`` come from it. The user columns are never dropped: the
data are tokenized here into plain Python lists, which ``Trainer`` does not prune.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .collate import SFTCollator
from .config import LAZY_ROWS_FROM, PDPOConfig, PersonalizationConfig, PSFTConfig
from .data import TokenizeSettings, load_preference_data, tokenize_dataset
from .guards import NonFiniteError, check_finite
from .health import health_causes, health_findings, health_split
from .losses import draw_user_terms, personalized_loss, preference_loss, sft_term
from .modeling import PersonalizedLM
from .models import load_model_and_tokenizer
from .optim import CombinedOptimizer, LazyAdam, clip_grad_norm_, grad_values
from .reference import (
    load_reference,
    memoized_reference,
    portable_path,
    precompute_reference_logps,
    reference_pair_logps,
    reference_record,
    training_reference,
)
from .scoring import packing_refusal, position_ids_from_mask, score_targets, verify_fast_paths
from .storage import atomic_write_text, save_folder
from .users import GENERIC_ROW, UserRegistry

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder: one whose ``trainer_state.json`` (written
    last by ``Trainer``) exists. A checkpoint cut off while being written is passed over."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _state_parses(p / TRAINER_STATE)]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _state_parses(path: Path) -> bool:
    """A checkpoint is complete when its trainer state (written last) is there and parses."""
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def check_checkpoint(checkpoint: str | os.PathLike, registry: UserRegistry | None = None) -> None:
    """Refuse a checkpoint that cannot be resumed: missing, torn (its trainer state does not parse),
    or trained on other users than ``registry`` (the saved embeddings would go to other people)."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    if not _state_parses(path / TRAINER_STATE):
        raise ValueError(f"resume_from_checkpoint: {path / TRAINER_STATE} is missing or does not parse: the checkpoint "
                         "was cut off while being written; resume from an earlier one (or pass --resume_from_checkpoint last)")
    users = path / "users.json"
    if registry is not None and users.is_file():
        saved = UserRegistry.load(users)
        if saved.ids != registry.ids:
            new, gone = sorted(set(registry.ids) - set(saved.ids)), sorted(set(saved.ids) - set(registry.ids))
            detail = (f"{len(new)} user(s) not in the checkpoint (e.g. {new[:3]}), {len(gone)} missing from the data "
                      f"(e.g. {gone[:3]})" if new or gone else "the same users in another order (other rows)")
            raise ValueError(f"resume_from_checkpoint: {path} was trained on other users than the training data: {detail}. "
                             "Resume with the data it was trained on, or start a new output_dir")


class CompactProgressCallback(ProgressCallback):
    """A progress bar whose postfix shows the loss and the preference accuracy, instead of one
    printed dictionary per log step (per-user accuracies stay in ``state.log_history``)."""

    SHOWN = {"loss": "loss", "rewards/accuracies": "acc", "rewards_generic/accuracies": "acc_generic",
             "rewards/margins": "margin"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {short: f"{logs[key]:.3g}" for key, short in self.SHOWN.items() if isinstance(logs.get(key), (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


def use_compact_progress(trainer: Trainer) -> Trainer:
    """Swap the trainer's default progress printer for ``CompactProgressCallback``."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback())
    return trainer


def check_fast_paths(model: PersonalizedLM, args: PDPOConfig, examples: list[dict]) -> None:
    """Refuse packing where it cannot be exact for this model and these sequence lengths, and
    verify packing and the response-only LM head on the first pairs (``ValueError`` naming the
    setting to turn off)."""
    if args.packing and examples:
        longest = max(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) + len(e.get("user_text_ids", []))
                      for e in examples) + model.n_implicit_tokens
        refusal = packing_refusal(model.llm, longest)
        if refusal:
            raise ValueError(refusal)
    problem = verify_fast_paths(model, examples, args.packing, args.response_logits_only)
    if problem:
        raise ValueError(problem)


class FiniteGuard(TrainerCallback):
    """Stops training at the first non-finite gradient (before the optimizer step) or weight (after
    it, before any checkpoint is written): the last checkpoint on disk stays the last good one."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            for name, p in model.named_parameters():
                if p.grad is not None and not bool(torch.isfinite(grad_values(p.grad)).all()):
                    raise NonFiniteError(f"non-finite gradient (NaN or inf) at step {state.global_step + 1}: {name}; "
                                         "nothing of this step was applied or saved")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            try:
                check_finite(trainable, f"the weights after step {state.global_step}")
            except NonFiniteError as err:
                raise NonFiniteError(f"{err} (learning rate too large?); training stopped before saving them") from None


def personalization_config(args: PDPOConfig) -> PersonalizationConfig:
    return PersonalizationConfig(
        base_model_name_or_path=portable_path(args.model_name_or_path),
        user_model=args.user_model,
        n_user_tokens=args.n_user_tokens,
        n_clusters=args.n_clusters,
        cluster_weighting=args.cluster_weighting,
        user_init=args.user_init,
        user_offset_init=args.user_offset_init,
        max_user_text_tokens=args.max_user_text_tokens,
        use_lora=args.use_lora,
        user_id_prompt=args.user_id_prompt if args.user_id_in_prompt else None,
        seed=args.seed,
        user_position=args.user_position,
    )


def check_sharding(accelerator, args) -> None:
    """FSDP or DeepSpeed asked for (``--fsdp`` / ``--deepspeed``, or an ``accelerate launch``
    config) but not what accelerate runs: an error, instead of a silent data-parallel run that
    keeps a full copy of the model in every process. accelerate shards with FSDP and DeepSpeed on
    GPUs (and other accelerators); on CPUs it runs data parallel (DDP over gloo) and ignores both."""
    from accelerate.utils import DistributedType

    env = lambda k: os.environ.get(k, "false").lower() == "true"  # noqa: E731
    asked = {"FSDP": (bool(getattr(args, "fsdp", None)) or env("ACCELERATE_USE_FSDP"), DistributedType.FSDP),
             "DeepSpeed": (bool(getattr(args, "deepspeed", None)) or env("ACCELERATE_USE_DEEPSPEED"), DistributedType.DEEPSPEED)}
    running = accelerator.distributed_type
    for name, (wanted, kind) in asked.items():
        if wanted and running != kind:
            raise ValueError(
                f"{name} was asked for, but accelerate runs this job as {running.value}"
                + (" (CPUs: accelerate shards with FSDP and DeepSpeed on GPUs only, and would train data-parallel with a "
                   "full copy of the model in every process)" if args.use_cpu or not torch.cuda.is_available() else "")
                + f". Remove the {name} settings to train data-parallel (on CPUs: `accelerate launch --multi_gpu "
                  "--num_processes N ...`, gloo), or run on GPUs; the configs are in docs/performance.md.")


class _ResumableTrainer(Trainer):
    """Resuming picks the newest complete checkpoint; weights are restored by the model's own loader.
    Non-finite losses, gradients and weights stop training (``FiniteGuard``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_sharding(self.accelerator, self.args)
        self.add_callback(FiniteGuard())

    def _registry(self) -> UserRegistry | None:
        return None

    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict gathered from the shards (every process must call it), or
        None when each process holds the whole model."""
        return self.accelerator.get_state_dict(self.model) if self.sharded() else None

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} holds no complete checkpoint-N folder")
        if resume_from_checkpoint:
            if self.sharded():
                raise ValueError(f"resuming from {resume_from_checkpoint}: checkpoints of a sharded run (FSDP, DeepSpeed) "
                                 "hold the gathered weights, which prlhf does not load back into shards; start a new run "
                                 "from the saved model folder (model_name_or_path), or resume without sharding")
            check_checkpoint(resume_from_checkpoint, self._registry())
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteError(f"non-finite loss (NaN or inf) at step {self.state.global_step + 1}"
                                 f"{self._nonfinite_detail()}; nothing of this step was applied or saved")
        return loss

    def _nonfinite_detail(self) -> str:
        return ""

    def save_state(self) -> None:
        """``Trainer.save_state`` (``trainer_state.json`` in output_dir: log history, evaluations,
        health signal), written atomically."""
        if self.args.should_save:
            from dataclasses import asdict

            state = json.dumps(asdict(self.state), indent=2, sort_keys=True) + "\n"
            atomic_write_text(Path(self.args.output_dir) / TRAINER_STATE, state)


def disable_dropout(module: torch.nn.Module) -> None:
    """Turn off every dropout of a model (``nn.Dropout`` modules, LoRA's included, and the
    attention dropout rates that attention layers read from their config), as TRL's
    ``disable_dropout`` does: the policy's and the reference's log-probs are then deterministic."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _load_records(source, what: str):
    if source is None:
        raise ValueError(f"no {what} data: pass {what}_dataset or set {what}_file")
    return load_preference_data(source)


class _PreferenceTrainer(_ResumableTrainer):
    """What the pairwise trainers (``PDPOTrainer``, ``prlhf.reward.PRMTrainer``) share: preference
    metrics logged as TRL logs them (means per logging step, per-user accuracy for few users), and
    a separate learning rate for the user model (``user_learning_rate``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a per-batch mean
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._user_hits = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}
        self._eval_pairs: list[tuple[int, float, float]] = []
        self.health_warning: str | None = None  # the "users are not separating" warning, once given
        self.health_warnings: dict[str, str] = {}  # every health warning given, by kind
        self.health_groups: dict[str, str] = getattr(self, "health_groups", None) or {}

    def _registry(self) -> UserRegistry | None:
        return self.accelerator.unwrap_model(self.model).registry

    def pair_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(mean loss, metrics with ``_hits`` = (user rows, per-pair hits)) of a collated batch."""
        raise NotImplementedError

    def terms_needed(self, pm, args: PDPOConfig | None = None) -> tuple[bool, bool]:
        """(user term, generic term) forward passes this step needs: both unless alpha is 1 or 0, or
        the user model cannot tell users apart (``none``, ``uniform``: the generic term is the user term)."""
        alpha = (args or self.args).alpha
        distinct = pm.user_model is not None and pm.user_model.depends_on_user
        if not distinct:
            return True, False
        return alpha > 0, alpha < 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.pair_loss(model, inputs)
        self._store("train" if model.training else "eval", metrics)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.pair_loss(model, inputs)
        self._store("eval", metrics)
        return loss.detach(), None, None

    # -- metrics ------------------------------------------------------------------------------

    def _store(self, mode: str, metrics: dict) -> None:
        rows, hits = metrics.pop("_hits")
        generic_hits = metrics.pop("_generic_hits", None)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        for r, h in zip(rows, hits):
            acc = self._user_hits[mode][r]
            acc[0] += h
            acc[1] += 1
        if mode == "eval" and generic_hits is not None:  # per pair: (row, user-term hit, generic-term hit)
            self._eval_pairs.extend(zip(rows, hits, generic_hits))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        stored = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        registry = self._registry()
        if len(registry) <= self.args.log_per_user_max:
            for row, (h, c) in sorted(self._user_hits[mode].items()):
                uid = registry.ids[row - 1] if row > 0 else "generic"
                stored[f"rewards/accuracies_user/{uid}"] = h / c
        if mode == "eval":
            stored = {f"eval_{k}": v for k, v in stored.items()}
            stored.update(self._health_metrics())
            self._last_eval_metrics = stored
        logs = {**logs, **stored}
        self._metrics[mode].clear()
        self._user_hits[mode].clear()
        super().log(logs, start_time)
        if mode == "eval" and "eval_flip_rate" in stored:
            self._check_health(stored)

    # -- the health signal: do the users separate? ----------------------------------------------

    def _health_metrics(self) -> dict[str, float]:
        """Pair-level accuracies of the evaluation just run, under TRL-style names: the user term's
        (``eval_rewards/accuracies``), the generic user's (``eval_rewards/accuracies_generic``), and
        the user-swap flip rate (``eval_flip_rate``: the share of pairs whose preference changes when
        the user's embedding is replaced by e_0; ``eval_flip_rate/<group>`` per users.json group)."""
        pairs, self._eval_pairs = self._eval_pairs, []
        pairs = [(r, h, g) for r, h, g in pairs if r != GENERIC_ROW]  # the generic user's own pairs cannot flip
        if not pairs:
            return {}
        registry, groups = self._registry(), self.health_groups
        n = len(pairs)
        out = {"eval_rewards/accuracies": sum(h for _, h, _ in pairs) / n,
               "eval_rewards/accuracies_generic": sum(g for _, _, g in pairs) / n,
               "eval_flip_rate": sum(h != g for _, h, g in pairs) / n}
        if groups:
            by_group: dict[str, list[float]] = defaultdict(list)
            for r, h, g in pairs:
                by_group[groups.get(registry.ids[r - 1], "other")].append(float(h != g))
            for name, flips in sorted(by_group.items()):
                out[f"eval_flip_rate/{name}"] = sum(flips) / len(flips)
        return out

    def _check_health(self, logs: dict[str, float]) -> None:
        """Warn once per finding of ``health_findings`` (users not separating; held-out accuracy
        not following the training accuracy), with the settings to look at."""
        state = self.state
        if not state.max_steps:
            return
        train_acc = [e["rewards/accuracies"] for e in state.log_history if "rewards/accuracies" in e and "loss" in e]
        for kind, message in health_findings(state.global_step, state.max_steps, logs, train_acc):
            if kind in self.health_warnings:
                continue
            if kind == "not_separating":
                message += ". Settings to look at: " + "; ".join(health_causes(self.args))
                message += ". If your users really share one preference, this is expected."
                self.health_warning = message
            self.health_warnings[kind] = message
            logger.warning(message)
            print(f"WARNING: {message}", file=sys.stderr, flush=True)
            state.log_history.append({"health_warning": message, "step": state.global_step})

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """``Trainer.evaluate`` plus the preference metrics (``eval_rewards/accuracies``, ...)."""
        self._last_eval_metrics = {}
        metrics = super().evaluate(*args, **kwargs)
        metrics.update(self._last_eval_metrics)
        return metrics

    # -- optimizer: a separate learning rate for the user model -------------------------------

    def lazy_user_table(self, model=None) -> torch.nn.Parameter | None:
        """The per-user table updated lazily (``user_rows_update``), or None when it is dense."""
        um = getattr(self.accelerator.unwrap_model(model or self.model), "user_model", None)
        if um is None or um.per_user_param is None:
            return None
        table = getattr(um, um.per_user_param)
        mode = self.args.user_rows_update
        if mode == "lazy" and self.args.world_size > 1:
            raise ValueError(f"user_rows_update 'lazy' runs in one process only ({self.args.world_size} here): the per-user "
                             "rows' sparse gradients are not all-reduced by every backend; use 'dense' (or 'auto')")
        # auto: lazy from LAZY_ROWS_FROM users, in one process
        lazy = mode == "lazy" or (mode == "auto" and um.n_rows - 1 >= LAZY_ROWS_FROM and self.args.world_size == 1)
        return table if lazy and table.requires_grad else None

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        table = self.lazy_user_table(opt_model) if self.optimizer is None else None
        if self.optimizer is None and (self.args.user_learning_rate is not None or table is not None):
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and p is not table]
            user = [p for n, p in named if "user_model" in n.split(".")]
            rest = [p for n, p in named if "user_model" not in n.split(".")]
            user_lr = self.args.user_learning_rate if self.args.user_learning_rate is not None else self.args.learning_rate
            groups = [{"params": rest, "weight_decay": self.args.weight_decay},
                      {"params": user, "weight_decay": 0.0, "lr": user_lr}]
            self.optimizer = cls([g for g in groups if g["params"]], **kwargs)
            if table is not None:  # the per-user rows: sparse gradients, moments and updates for the batch's rows only
                self.accelerator.unwrap_model(opt_model).user_model.sparse_rows = True
                lazy = LazyAdam([table], lr=user_lr, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                eps=self.args.adam_epsilon)
                self.optimizer = CombinedOptimizer(self.optimizer, lazy)
        return super().create_optimizer(model)

    def _clip_grad_norm(self, model):
        if self.lazy_user_table(model) is None:
            return super()._clip_grad_norm(model)
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.lazy_user_table(model) is not None:
            grad_norm = clip_grad_norm_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)


class PDPOTrainer(_PreferenceTrainer):
    """Personalized DPO: trains the LLM and the user model jointly.

    Per pair (x, y_w, y_l, u): L = alpha * l(Delta_P) + (1 - alpha) * l(Delta_P0), where l is the
    preference loss (``loss_type``), Delta_P uses the user's embedding and Delta_P0 the generic
    user's (explicit user text kept). With ``sft_weight`` = lambda > 0, each term adds lambda times
    the mean token NLL of the chosen response under that term's user (RPO; TRL's
    ``loss_type=["sigmoid", "sft"]``), which keeps the chosen responses likely. The unused term's forward pass is skipped when alpha is 1
    or 0, and when the user model cannot tell users apart (``none``, ``uniform``), where both
    terms are equal.
    """

    def __init__(self, model: PersonalizedLM | None = None, args: PDPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, reference_model: torch.nn.Module | None = None, processing_class=None, **kwargs):
        args = args or PDPOConfig()
        train_records = _load_records(train_dataset if train_dataset is not None else args.train_file, "train")
        eval_source = eval_dataset if eval_dataset is not None else args.eval_file
        eval_records = load_preference_data(eval_source) if eval_source is not None else None
        train_records, eval_records, self.health_groups = health_split(args, train_records, eval_records)
        if model is None:
            model = PersonalizedLM.build(
                personalization_config(args), UserRegistry.from_records(train_records),
                lora_kwargs=args.lora_kwargs(), trust_remote_code=args.trust_remote_code, load_kwargs=args.load_kwargs(),
            )
        tokenizer = processing_class or model.tokenizer
        settings = model.tokenize_settings(args.max_length, args.max_prompt_length)
        train = tokenize_dataset(train_records, tokenizer, settings, model.registry, args.train_file or "train_dataset")
        evals = tokenize_dataset(eval_records, tokenizer, settings, model.registry, args.eval_file or "eval_dataset") if eval_records else None
        check_fast_paths(model, args, train + (evals or []))

        ref_path = args.reference_model_name_or_path
        reference_model = training_reference(ref_path, reference_model, trust_remote_code=args.trust_remote_code,
                                             **args.load_kwargs())
        # recorded for `prlhf eval`, which must score against the reference that training used
        model.prlhf_config.reference_model_name_or_path = reference_record(model, reference_model, ref_path)
        if args.disable_dropout:
            disable_dropout(model)
            if reference_model is not None:
                disable_dropout(reference_model)
        collator = model.collator(args.padding_side, args.packing, self.packed_terms(model, args))
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, **kwargs)
        if reference_model is not None:
            reference_model = reference_model.requires_grad_(False).to(self.args.device).eval()
        # a reference passed in as an object stays available to evaluation after training (the
        # caller holds it anyway); one loaded here from a path is reloaded for evaluation instead
        self._given_reference = reference_model if ref_path is None else None
        self.reference_cache_hits, self.reference_seconds = 0, 0.0
        # lazy_reference (LoRA, the reference being the base): each pair's reference log-probs the
        # first time a step visits it, kept in memory: a run that sees part of the data pays for that part
        self._lazy_reference = {} if (args.precompute_ref_log_probs and args.lazy_reference and model.is_lora
                                      and reference_model is None) else None
        if args.lazy_reference and self._lazy_reference is None:
            logger.warning("lazy_reference applies only to LoRA policies whose reference is the base (adapters disabled) "
                           "with precompute_ref_log_probs; ignored here")
        if args.precompute_ref_log_probs and self._lazy_reference is None:
            # pi_SFT is the policy itself before any step (or the LoRA base, adapters off): no copy of the weights
            self.precompute_reference({"train": train, "eval": evals}, reference_model)
            reference_model = None  # not kept: training reads the precomputed log-probs
        elif reference_model is None and not model.is_lora:
            reference_model = copy.deepcopy(model.llm).requires_grad_(False).eval()
        self.reference_model = reference_model

    def reference_for_eval(self) -> torch.nn.Module | None:
        """pi_SFT for ``evaluate_accuracy`` after training, the one training used: the reference the
        trainer holds or was given, None for LoRA without a reference (adapters disabled), else the
        recorded reference model loaded afresh (training with precomputed reference log-probs keeps
        no copy of it)."""
        pm: PersonalizedLM = self.accelerator.unwrap_model(self.model)
        if self.reference_model is not None:
            return self.reference_model
        if self._given_reference is not None:
            return self._given_reference
        if pm.is_lora and pm.prlhf_config.reference_model_name_or_path is None:
            return None
        return load_reference(pm, trust_remote_code=self.args.trust_remote_code, **self.args.load_kwargs())

    # -- reference log-probs, once -------------------------------------------------------------

    def precompute_reference(self, datasets: dict[str, list[dict] | None], reference: torch.nn.Module | None = None) -> None:
        """Fill ``ref_logps`` of every tokenized example of ``datasets`` (name -> examples) with log
        pi_SFT, once before training, or from the disk cache (``reference_cache_dir``): see
        ``prlhf.reference.precompute_reference_logps``. Counts cache hits in
        ``reference_cache_hits`` and the seconds spent computing in ``reference_seconds``."""
        pm: PersonalizedLM = self.accelerator.unwrap_model(self.model)
        a = self.args
        meta = {"reference": pm.prlhf_config.reference_model_name_or_path or pm.prlhf_config.base_model_name_or_path,
                "max_length": a.max_length, "max_prompt_length": a.max_prompt_length}
        hits, seconds = precompute_reference_logps(
            pm, datasets, reference, a.per_device_eval_batch_size, a.reference_cache_dir,
            "+bf16" if a.bf16 else "+fp16" if a.fp16 else "", meta, once=lambda desc: a.main_process_first(desc=desc),
            packing=a.packing, full_logits=not a.response_logits_only, disable_progress=a.disable_tqdm, device=a.device,
            context=self.compute_loss_context_manager)
        self.reference_cache_hits += hits
        self.reference_seconds += seconds

    # -- the objective ------------------------------------------------------------------------

    def packed_terms(self, pm: PersonalizedLM, args: PDPOConfig) -> int:
        """Terms per packed row: 2 when both terms run on one prompt (``user_position:
        before_response`` with packing, without alpha_sampling), else 1."""
        both = all(self.terms_needed(pm, args))
        return 2 if both and args.packing and args.user_position == "before_response" and not args.alpha_sampling else 1

    def pair_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.pdpo_loss(model, batch)

    def pdpo_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        pm: PersonalizedLM = self.accelerator.unwrap_model(model)
        user_rows = batch["user_rows"]  # (B,)
        B = user_rows.shape[0]
        need_user, need_generic = self.terms_needed(pm)
        if need_user and need_generic and self.args.alpha_sampling and model.training:
            return self._sampled_pdpo_loss(model, pm, batch)
        # with both terms, pairs of the generic user itself have equal terms: their generic rows are not run twice
        selected = user_rows != GENERIC_ROW if need_user and need_generic else None
        terms = [("user", user_rows, None)] if need_user else []
        # a row that packs both terms runs both (its generic term of generic-user pairs is not used)
        if need_generic and (selected is None or bool(selected.any()) or "n_terms" in batch):
            terms.append(("generic", torch.full_like(user_rows, GENERIC_ROW), selected))
        # ONE forward pass for every term and every chosen / rejected sequence of the batch
        full_logits = not self.args.response_logits_only
        logps = model(pairs=batch, terms=[(rows, sel) for _, rows, sel in terms], full_logits=full_logits)  # (n, 2B)
        by_name = {name: logps[k] for k, (name, _, _) in enumerate(terms)}
        if selected is not None:  # the generic term of generic-user pairs is their user term
            run = by_name.get("generic")
            by_name["generic"] = by_name["user"] if run is None else torch.where(selected.repeat(2), run, by_name["user"])
        ref = self._batch_reference(pm, batch, full_logits, logps.dtype)  # (2B,)

        out, metrics = {}, {}
        for name, lp in by_name.items():
            losses, chosen_r, rejected_r = preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], self.args.beta,
                                                           self.args.loss_type, self.args.label_smoothing)
            if self.args.sft_weight:
                nll = sft_term(lp[:B], batch["n_tokens"][:B])  # mean token NLL of the chosen response (B,)
                losses = losses + self.args.sft_weight * nll
                metrics[f"nll/{name}"] = nll.detach().mean().item()
            out[name] = (losses, chosen_r, rejected_r, lp[:B].detach(), lp[B:].detach())
        if need_user and need_generic:
            loss = personalized_loss(out["user"][0], out["generic"][0], self.args.alpha).mean()
        else:
            loss = next(iter(out.values()))[0].mean()
        self._last_terms = {"reference log-probs": ref.detach(),
                            **{f"policy log-probs ({n} term)": lp.detach() for n, lp in by_name.items()},
                            **{f"{n} term of the loss": o[0].detach() for n, o in out.items()}}

        main = out.get("user") or out["generic"]
        _, cr, rr, lpc, lpr = main
        g = self.accelerator.gather_for_metrics
        cr, rr, rows_all = g(cr), g(rr), g(user_rows)
        metrics.update(self._pair_metrics(cr, rr, lpc, lpr, ref))
        metrics["rewards/accuracies"] = (cr > rr).float().mean().item()
        if "generic" in out and "user" in out:
            gcr, grr = g(out["generic"][1]), g(out["generic"][2])
            metrics["rewards_generic/accuracies"] = (gcr > grr).float().mean().item()
            metrics["rewards_generic/margins"] = (gcr - grr).mean().item()
        metrics["_hits"] = (rows_all.tolist(), (cr > rr).float().tolist())
        if "generic" in out and "user" in out:
            metrics["_generic_hits"] = (gcr > grr).float().tolist()
        return loss, metrics

    def _sampled_pdpo_loss(self, model, pm: PersonalizedLM, batch: dict) -> tuple[torch.Tensor, dict]:
        """``alpha_sampling``: each pair is scored once, under its user with probability alpha and
        under the generic user otherwise (drawn from torch's global generator, which the Trainer
        seeds and checkpoints), in one forward pass of the batch's size. E[loss] equals the alpha
        mix of ``pdpo_loss`` (the per-pair terms are the same functions), at half its cost."""
        user_rows = batch["user_rows"]
        B = user_rows.shape[0]
        use_user = draw_user_terms(B, self.args.alpha, user_rows.device)
        rows = torch.where(use_user, user_rows, torch.full_like(user_rows, GENERIC_ROW))
        full_logits = not self.args.response_logits_only
        lp = model(pairs=batch, terms=[(rows, None)], full_logits=full_logits)[0]  # (2B,)
        ref = self._batch_reference(pm, batch, full_logits, lp.dtype)
        losses, cr, rr = preference_loss(lp[:B], lp[B:], ref[:B], ref[B:], self.args.beta, self.args.loss_type,
                                         self.args.label_smoothing)
        metrics = {}
        if self.args.sft_weight:
            nll = sft_term(lp[:B], batch["n_tokens"][:B])
            losses = losses + self.args.sft_weight * nll
            metrics["nll/sampled"] = nll.detach().mean().item()
        loss = losses.mean()
        self._last_terms = {"reference log-probs": ref.detach(), "policy log-probs (sampled terms)": lp.detach(),
                            "sampled terms of the loss": losses.detach()}
        g = self.accelerator.gather_for_metrics
        cr, rr, use_user, rows_all = g(cr.detach()), g(rr.detach()), g(use_user), g(user_rows)
        metrics.update(self._pair_metrics(cr, rr, lp[:B].detach(), lp[B:].detach(), ref))
        hit = (cr > rr).float()
        # accuracies per term over the pairs that drew it (a term no pair drew logs nothing this step)
        if bool(use_user.any()):
            metrics["rewards/accuracies"] = hit[use_user].mean().item()
        if bool((~use_user).any()):
            metrics["rewards_generic/accuracies"] = hit[~use_user].mean().item()
            metrics["rewards_generic/margins"] = (cr - rr)[~use_user].mean().item()
        metrics["_hits"] = (rows_all[use_user].tolist(), hit[use_user].tolist())
        return loss, metrics

    def _batch_reference(self, pm: PersonalizedLM, batch: dict, full_logits: bool, dtype) -> torch.Tensor:
        """log pi_SFT of chosen and rejected (2B,): precomputed in the batch, else computed now
        (``lazy_reference``: once per pair, then remembered)."""
        if "ref_logps" in batch:
            return batch["ref_logps"].to(dtype)
        if self._lazy_reference is not None:
            mode = "train" if pm.training else "eval"  # record indices restart in each data set
            keys = [(mode, i) for i in batch["index"].tolist()]

            def compute():
                start, was_training = time.perf_counter(), pm.training
                pm.eval()  # as the precomputed pass: no dropout
                try:
                    return reference_pair_logps(pm, batch, None, full_logits=full_logits)
                finally:
                    pm.train(was_training)
                    self.reference_seconds += time.perf_counter() - start

            return memoized_reference(self._lazy_reference, keys, compute, batch["index"].device, dtype)
        if self.reference_model is None and not pm.is_lora:
            raise ValueError("this batch has no precomputed reference log-probs and the trainer holds no reference model: "
                             "pass the data as train_dataset / eval_dataset when building the trainer (they are "
                             "precomputed then), or set precompute_ref_log_probs=False")
        return reference_pair_logps(pm, batch, self.reference_model, full_logits=full_logits)

    def _pair_metrics(self, cr, rr, lpc, lpr, ref) -> dict:
        """TRL's reward and log-prob means; ``cr``/``rr`` already gathered, the rest gathered here."""
        g = self.accelerator.gather_for_metrics
        B = lpc.shape[0]
        return {"rewards/chosen": cr.mean().item(), "rewards/rejected": rr.mean().item(),
                "rewards/margins": (cr - rr).mean().item(), "logps/chosen": g(lpc).mean().item(),
                "logps/rejected": g(lpr).mean().item(), "logps/ref_chosen": g(ref[:B]).mean().item(),
                "logps/ref_rejected": g(ref[B:]).mean().item()}

    def _nonfinite_detail(self) -> str:
        bad = [name for name, t in getattr(self, "_last_terms", {}).items() if not bool(torch.isfinite(t).all())]
        return f": {', '.join(bad)} (beta {self.args.beta}, alpha {self.args.alpha})" if bad else ""

    # -- save / resume ------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save with ``PersonalizedLM.save_pretrained`` (base or adapter, user model, registry, config)."""
        output_dir = output_dir or self.args.output_dir
        state_dict = self.full_state_dict()
        if self.args.should_save:
            a = self.args
            training = {"training data": a.train_file, "steps": self.state.global_step, "beta": a.beta, "alpha": a.alpha,
                        "loss": a.loss_type, "sft_weight": a.sft_weight or None, **a.effective_settings()}
            logged = {k: v for entry in self.state.log_history[-2:] for k, v in entry.items()
                      if isinstance(v, (int, float)) and not k.startswith("rewards/accuracies_user/")}
            self.accelerator.unwrap_model(self.model).save_pretrained(
                output_dir, state_dict=state_dict, extra_files={"training_args.json": a.to_json_string()},
                card_training=training, card_metrics=logged or None)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.accelerator.unwrap_model(model or self.model).load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_weights_from(self.state.best_model_checkpoint)


class PSFTTrainer(_ResumableTrainer):
    """Supervised fine-tuning on prompt -> chosen, user-agnostic: the mean token NLL of chosen responses."""

    def __init__(self, model=None, args: PSFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, **kwargs):
        args = args or PSFTConfig()
        tokenizer = processing_class
        if model is None:
            model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, trust_remote_code=args.trust_remote_code,
                                                        **args.load_kwargs())
            if args.use_lora:
                from peft import LoraConfig, get_peft_model

                model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **args.lora_kwargs()))
        if tokenizer is None:
            raise ValueError("PSFTTrainer needs processing_class (the tokenizer) when a model is given")
        settings = TokenizeSettings(args.max_length, args.max_prompt_length, 0, 0)
        registry = UserRegistry()
        train = tokenize_dataset(_load_records(train_dataset if train_dataset is not None else args.train_file, "train"),
                                 tokenizer, settings, registry, args.train_file or "train_dataset")
        eval_source = eval_dataset if eval_dataset is not None else args.eval_file
        evals = tokenize_dataset(load_preference_data(eval_source), tokenizer, settings, registry, args.eval_file or "eval_dataset") if eval_source is not None else None
        collator = SFTCollator(tokenizer.pad_token_id, tokenizer.bos_token_id, args.padding_side)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train, eval_dataset=evals,
                         processing_class=tokenizer, **kwargs)
        self.model_accepts_loss_kwargs = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints and saves as whole folders, atomically, with ``manifest.json``."""
        output_dir = output_dir or self.args.output_dir
        state_dict = self.full_state_dict()
        if self.args.should_save:
            weights = state_dict if state_dict is not None else dict(self.model.named_parameters())
            trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
            check_finite({n: p for n, p in weights.items() if n in trainable}, f"the weights to save in {output_dir}")
            save_folder(output_dir, lambda tmp: Trainer._save(self, str(tmp), state_dict=state_dict))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Mean token NLL of the chosen responses. Training applies the LM head at the response
        positions only (``response_logits_only``); evaluation, which returns logits, at every position."""
        mask = inputs["attention_mask"]
        labels = inputs["labels"][:, 1:]
        llm = self.accelerator.unwrap_model(model)
        # the head at response positions calls the model's parts, not its forward: only where no distributed wrapper
        # (DDP) or sharding (FSDP, DeepSpeed) needs the forward call
        if self.args.response_logits_only and not return_outputs and model is llm and not self.sharded():
            T = inputs["input_ids"].shape[1]
            rows, cols = (labels != -100).nonzero(as_tuple=True)  # position (row, col) predicts labels[row, col]
            token_logps = score_targets(llm, llm.get_input_embeddings()(inputs["input_ids"]), {"attention_mask": mask},
                                        rows * T + cols, labels[rows, cols])
            return -token_logps.mean()
        logits = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return (loss, {"logits": logits}) if return_outputs else loss

    def save_final(self, output_dir: str | None = None) -> str:
        """Save pi_SFT as a plain model folder (LoRA adapters merged), usable as ``model_name_or_path``."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        state_dict = self.full_state_dict()
        if state_dict is not None and hasattr(model, "merge_and_unload"):
            raise ValueError(f"saving {output_dir}: merging the LoRA adapters of a sharded run (FSDP, DeepSpeed) is not "
                             "supported; train pi_SFT without LoRA when sharding, or without sharding")
        if self.args.should_save:
            if hasattr(model, "merge_and_unload"):
                model = copy.deepcopy(model).merge_and_unload()
            check_finite(state_dict if state_dict is not None else dict(model.named_parameters()),
                         f"the weights to save in {output_dir}")

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
                self.processing_class.save_pretrained(tmp)
                (tmp / "training_args.json").write_text(self.args.to_json_string())

            save_folder(output_dir, write)
        return output_dir
