"""``PRMTrainer``: trains a ``PersonalizedRewardModel`` with the P-RM objective
(``prlhf.losses.prm_loss``): alpha * BT(user) + (1 - alpha) * BT(generic user), plus TRL's
optional centring term."""

from __future__ import annotations

import torch

from ..config.training import PRMConfig
from ..data import tokenize_dataset
from ..losses import draw_user_terms, prm_loss
from ..reward_model import PersonalizedRewardModel, build_reward_model
from ..users import GENERIC_ROW, UserRegistry
from .base import disable_dropout
from .preference import PreferenceTrainer, preference_records


class PRMTrainer(PreferenceTrainer):
    """Trains a ``PersonalizedRewardModel`` (backbone or LoRA adapter, user model and head) with the
    P-RM loss. Terms as in ``PDPOTrainer``: one forward pass for both terms (or, with
    ``alpha_sampling``, one term drawn per pair), the generic term skipped where it cannot differ
    (alpha 1, ``none`` / ``uniform`` user models). Logs ``rewards/accuracies`` (user term),
    ``rewards_generic/accuracies``, margins and per-user accuracy."""

    def __init__(self, model: PersonalizedRewardModel | None = None, args: PRMConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, **kwargs):
        args = args or PRMConfig()
        train_records, eval_records, self.health_groups = preference_records(args, train_dataset, eval_dataset)
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
