"""The training-time health signal: do the users separate?

With no evaluation data, P-DPO and P-RM training hold out a few pairs of the training users
(``health_split``) and evaluate them during training: seen and generic-user accuracy and the
user-swap flip rate, per user group (the trainers' ``_health_metrics``). ``health_findings`` reads
one such evaluation against the training accuracy and says when the users are not separating
(nothing flips; or the users' own embeddings do no better than the generic user) or when the
held-out accuracy does not follow the training accuracy (memorized pairs); ``health_causes`` names
the settings to look at.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from transformers.trainer_utils import IntervalStrategy

from .data import hold_out_pairs

if TYPE_CHECKING:
    from .config.training import PDPOConfig

logger = logging.getLogger(__name__)

HEALTH_FLIP_FLOOR = 0.05  # below this flip rate in every user group, users count as not separating
HEALTH_TRAIN_ACCURACY = 0.6  # ... while the training accuracy is at least this (or rising by 0.1)
HEALTH_GAP = 0.25  # training accuracy this far above a near-chance held-out accuracy: memorizing pairs


def health_split(args: PDPOConfig, train_records: list[dict], eval_records: list[dict] | None
                 ) -> tuple[list[dict], list[dict] | None, dict[str, str]]:
    """(training records, evaluation records, user groups) for the health signal: with no
    evaluation data and ``health_eval_pairs`` > 0, that many training pairs are held out (spread
    over the users) and evaluated during training; the groups come from ``users_file`` (default:
    users.json beside ``train_file``). Logs the run's effective personalization settings."""
    from .evaluation import load_user_groups

    logger.info("personalization settings: %s", ", ".join(f"{k}={v}" for k, v in args.effective_settings().items()))
    users = args.users_file or (Path(args.train_file).with_name("users.json") if args.train_file else None)
    groups = load_user_groups(users) if users is not None and Path(users).is_file() else {}
    if eval_records is not None or not args.health_check_active():
        return train_records, eval_records, groups
    kept, held = hold_out_pairs(train_records, args.health_eval_pairs, args.seed)
    if not held:
        logger.warning("health signal off: no training user has enough pairs to hold %d out (at most a quarter of "
                       "each user's pairs); give an eval_file to evaluate during training", args.health_eval_pairs)
        args.eval_strategy = IntervalStrategy.NO
        return train_records, None, groups
    logger.info("health signal: %d of %d training pairs held out (%d users) and evaluated at every evaluation "
                "(eval_steps %s): seen and generic-user accuracy, user-swap flip rate%s", len(held), len(train_records),
                len({r["user_id"] for r in held}), args.eval_steps, " per group" if groups else "")
    return kept, held, groups


def health_findings(step: int, max_steps: int, logs: dict[str, float], train_acc: list[float]) -> list[tuple[str, str]]:
    """What an evaluation of the health slice says, as (kind, message) pairs:

    * ``not_separating`` (from a quarter of the run on, while the training accuracy rises): no user
      group's held-out preferences flip when its users are swapped for the generic user (flip rate
      below ``HEALTH_FLIP_FLOOR`` in every group), or, from half of the run on, the users' own
      embeddings score the held-out pairs no better than the generic user does;
    * ``memorizing`` (from half of the run on): the training accuracy runs ``HEALTH_GAP`` or more
      above the held-out accuracy, which stays near chance: the pairs are being learned, not the
      preferences.

    ``train_acc``: the logged training accuracies so far (the last three are averaged)."""
    if not train_acc or step < 0.25 * max_steps:
        return []
    recent = sum(train_acc[-3:]) / len(train_acc[-3:])
    rising = recent >= HEALTH_TRAIN_ACCURACY or recent - train_acc[0] >= 0.1
    seen, generic = logs.get("eval_rewards/accuracies"), logs.get("eval_rewards/accuracies_generic")
    per_group = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("eval_flip_rate/")}
    flips = per_group or {"all users": logs["eval_flip_rate"]}
    where = f"at step {step} of {max_steps}"
    out = []
    if rising and max(flips.values()) < HEALTH_FLIP_FLOOR:
        out.append(("not_separating", (
            f"users are not separating: {where}, swapping each user for the generic user flips "
            f"{logs['eval_flip_rate']:.2f} of held-out preferences (by group: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(flips.items()))
            + f") while the training accuracy is {recent:.2f}: the LLM is learning one preference for everyone "
            "(the majority's) and the user model is not being used")))
    elif rising and step >= 0.5 * max_steps and seen is not None and generic is not None and seen <= generic:
        out.append(("not_separating", (
            f"users are not separating: {where}, the users' own embeddings score {seen:.2f} of held-out pairs, the "
            f"generic user {generic:.2f}, while the training accuracy is {recent:.2f}: the user model changes "
            f"preferences (flip rate {logs['eval_flip_rate']:.2f}) but not towards the users' own")))
    if step >= 0.5 * max_steps and seen is not None and recent - seen >= HEALTH_GAP and seen <= HEALTH_TRAIN_ACCURACY:
        out.append(("memorizing", (
            f"held-out accuracy is not following the training accuracy: {where}, {seen:.2f} on held-out pairs "
            f"against {recent:.2f} in training: the training pairs are being memorized rather than the preferences "
            "learned (more pairs per user, fewer epochs, or a lower learning_rate)")))
    return out


def health_causes(args) -> list[str]:
    """The likely causes of users that do not separate, for the health warning: the settings of
    ``args`` that differ from the measured-good ones first, then the ones that always apply."""
    causes = []
    user_lr = args.user_learning_rate if args.user_learning_rate is not None else args.learning_rate
    if user_lr < 1e-3:
        causes.append(f"user_learning_rate is {user_lr:g}: the user model needs a far larger step than the LLM "
                      "(measured good: 3e-2 with LoRA at 5e-4)")
    if getattr(args, "user_offset_init", None) == "zero":
        causes.append("user_offset_init is 'zero': every user starts as the generic user and the LLM learns the "
                      "majority before the offsets differ ('vocab' starts users apart)")
    schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if schedule not in ("constant", "constant_with_warmup"):
        causes.append(f"lr_scheduler_type is '{schedule}': a decaying rate stops the users before they separate "
                      "('constant' measured better)")
    causes.append("too few pairs per user (pool users who share a preference, or train longer)")
    causes.append(f"alpha {args.alpha} (the user term's weight; the generic term pulls every user to the majority)")
    return causes
