"""The objectives, as pure functions of log-probabilities and rewards (no model, no batch, no
trainer): P-DPO's preference losses and alpha mix, the SFT term, the alpha draw, and the reward
side's Bradley-Terry loss and P-RM mix.

Notation: pi_P(y|x,u) the personalized policy, pi_SFT(y|x) the reference (no user input),
h(y) = log pi_P(y|x,u) - log pi_SFT(y|x), and Delta = h(y_w) - h(y_l) for chosen y_w and rejected y_l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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


def sft_term(chosen_logps: torch.Tensor, n_chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The chosen response's mean token negative log-likelihood per pair (B,): the SFT term that
    ``sft_weight`` adds to each preference term (RPO; TRL's ``loss_type=["sigmoid", "sft"]``)."""
    return -chosen_logps / n_chosen_tokens.clamp(min=1)


def draw_user_terms(n: int, alpha: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``alpha_sampling``: for each of ``n`` pairs, True where it is scored under its user's term
    (probability alpha), False under the generic user's; drawn from torch's global generator (which
    the Trainer seeds and checkpoints). The expected loss is the alpha mix."""
    return torch.rand(n, device=device) < alpha


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_w - r_l) per pair."""
    return -F.logsigmoid(chosen - rejected)


def prm_loss(user: tuple[torch.Tensor, torch.Tensor], generic: tuple[torch.Tensor, torch.Tensor] | None, alpha: float,
             center_coefficient: float = 0.0) -> torch.Tensor:
    """The P-RM objective per pair (B,): alpha * BT(user) + (1 - alpha) * BT(generic) (the user term
    alone when ``generic`` is None), each term with its own centring penalty
    ``center_coefficient * (r_w + r_l)^2`` (TRL's ``RewardTrainer``)."""
    def term(rw, rl):
        out = bradley_terry_loss(rw, rl)
        if center_coefficient:
            out = out + center_coefficient * (rw + rl) ** 2
        return out

    if generic is None:
        return term(*user)
    return alpha * term(*user) + (1 - alpha) * term(*generic)
