"""``PDPOTrainer``: P-DPO (Li et al. 2024), the LLM and the user model trained jointly.

A ``transformers.Trainer``: optimizer, schedule, gradient accumulation, logging, checkpointing and
``accelerate launch`` come from it. The user columns are never dropped: the data are tokenized
here into plain Python lists, which ``Trainer`` does not prune.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from ..config.training import PDPOConfig
from ..data import tokenize_dataset
from ..layout import terms_per_packed_row
from ..losses import draw_user_terms, personalized_loss, preference_loss, sft_term
from ..modeling import PersonalizedLM
from ..reference import (
    load_reference,
    memoized_reference,
    precompute_reference_logps,
    reference_pair_logps,
    reference_record,
    training_reference,
)
from ..users import GENERIC_ROW, UserRegistry
from .base import check_fast_paths, disable_dropout
from .preference import PreferenceTrainer, preference_records

logger = logging.getLogger(__name__)


class PDPOTrainer(PreferenceTrainer):
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
        train_records, eval_records, self.health_groups = preference_records(args, train_dataset, eval_dataset)
        if model is None:
            model = PersonalizedLM.build(
                args.personalization_config(), UserRegistry.from_records(train_records),
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
        return terms_per_packed_row(args.user_position, args.packing, both, args.alpha_sampling)

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
