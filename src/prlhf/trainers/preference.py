"""What the pairwise trainers (P-DPO, P-RM) share: preference metrics logged as TRL logs them, the
health signal (do the users separate?), and the user model's own learning rate (with lazily
updated per-user rows for many users)."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict

import torch
from transformers import Trainer

from ..config.training import LAZY_ROWS_FROM, PDPOConfig
from ..data import load_preference_data
from ..health import health_causes, health_findings, health_split
from ..optim import CombinedOptimizer, LazyAdam, clip_grad_norm_
from ..users import GENERIC_ROW, UserRegistry
from .base import ResumableTrainer, load_records

logger = logging.getLogger(__name__)


def preference_records(args, train_dataset=None, eval_dataset=None) -> tuple[list[dict], list[dict] | None, dict]:
    """The pairwise trainers' records: train and eval (the given data sets, else ``train_file`` /
    ``eval_file``), with the health slice held out of training when there is no eval data
    (``health_split``): (train records, eval records, user groups)."""
    train_records = load_records(train_dataset if train_dataset is not None else args.train_file, "train")
    eval_source = eval_dataset if eval_dataset is not None else args.eval_file
    eval_records = load_preference_data(eval_source) if eval_source is not None else None
    return health_split(args, train_records, eval_records)


class PreferenceTrainer(ResumableTrainer):
    """What the pairwise trainers (``PDPOTrainer``, ``prlhf.trainers.prm.PRMTrainer``) share: preference
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

    # -- private Trainer methods overridden (checked against transformers 5.24; tests/test_trainers.py
    # test_private_trainer_methods_we_override_keep_their_signatures fails when they change) --------

    def _clip_grad_norm(self, model):
        # the lazily updated per-user rows have sparse gradients, which accelerate's clipping does not take
        if self.lazy_user_table(model) is None:
            return super()._clip_grad_norm(model)
        return clip_grad_norm_(model.parameters(), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.lazy_user_table(model) is not None:
            grad_norm = clip_grad_norm_(model.parameters(), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # a model folder is not one state dict (adapter or base, user model, users.json): the model loads it
        self.accelerator.unwrap_model(model or self.model).load_weights_from(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_weights_from(self.state.best_model_checkpoint)
