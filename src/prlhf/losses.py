"""The P-DPO objective, as pure functions of log-probabilities (no model, no batch, no trainer).

Notation: pi_P(y|x,u) the personalized policy, pi_SFT(y|x) the reference (no user input),
h(y) = log pi_P(y|x,u) - log pi_SFT(y|x), and Delta = h(y_w) - h(y_l) for chosen y_w and rejected y_l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each sequence.

    logits (N, T, V) predict token t+1 at position t; labels (N, T) hold the token ids to score
    and -100 elsewhere. Returns (N,): sum_t log p(labels[t] | tokens < t).
    """
    labels = labels[:, 1:]  # (N, T-1)
    logits = logits[:, :-1]  # (N, T-1, V)
    mask = labels != -100
    safe = labels.masked_fill(~mask, 0)
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, safe.unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (token_logps * mask).sum(-1)


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example preference losses and implicit rewards.

    With Delta = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)):

    * ``sigmoid`` (DPO, Rafailov et al. 2023; conservative DPO when ``label_smoothing`` = eps > 0):
      L = -(1 - eps) log sigma(beta Delta) - eps log sigma(-beta Delta)
    * ``ipo`` (Azar et al. 2023, Eq. 17): L = (Delta - 1 / (2 beta))^2, on summed log-probs
    * ``hinge`` (SLiC, Zhao et al. 2023): L = max(0, 1 - beta Delta)

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,), with the implicit rewards
    r(y) = beta (log pi(y) - log pi_ref(y)) detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    delta = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def personalized_loss(user_losses: torch.Tensor | None, generic_losses: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """P-DPO's mixture (Li et al. 2024, Eq. 6), per example:

        L = alpha * L(Delta_P) + (1 - alpha) * L(Delta_P0)

    where Delta_P uses the user's embedding and Delta_P0 the generic user's. With alpha = 1 the
    generic term is not needed (``generic_losses`` may be None), with alpha = 0 the user term.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if alpha == 1.0:
        return user_losses
    if alpha == 0.0:
        return generic_losses
    return alpha * user_losses + (1 - alpha) * generic_losses
