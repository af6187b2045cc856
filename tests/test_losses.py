"""preference_loss and the alpha mixing against hand-computed numbers."""

import math

import pytest
import torch
from conftest import sequence_logps

from prlhf.losses import draw_user_terms, personalized_loss, preference_loss, sft_term

# log-probs of two pairs: policy (chosen, rejected) and reference (chosen, rejected)
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
# Delta = (pc - rc) - (pr - rr): pair 0: 0.5 - (-0.5) = 1.0; pair 1: -1.0 - 1.0 = -2.0
DELTA = [1.0, -2.0]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_matches_hand_computation():
    beta = 0.5
    losses, cr, rr = preference_loss(PC, PR, RC, RR, beta)
    expected = [-log_sigmoid(beta * d) for d in DELTA]  # 0.474077, 1.313262
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses[0].item() == pytest.approx(0.4740769841801067, abs=1e-6)
    assert cr.tolist() == pytest.approx([0.25, -0.5])  # beta * (pc - rc)
    assert rr.tolist() == pytest.approx([-0.25, 0.5])  # beta * (pr - rr)


def test_label_smoothing_matches_conservative_dpo_by_hand():
    beta, eps = 0.5, 0.1
    losses, _, _ = preference_loss(PC, PR, RC, RR, beta, label_smoothing=eps)
    expected = [-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d) for d in DELTA]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_ipo_matches_hand_computation():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _ = preference_loss(PC, PR, RC, RR, beta, loss_type="ipo")
    assert losses.tolist() == pytest.approx([(1.0 - 2.0) ** 2, (-2.0 - 2.0) ** 2])  # [1, 16]


def test_hinge_matches_hand_computation():
    beta = 0.5
    losses, _, _ = preference_loss(PC, PR, RC, RR, beta, loss_type="hinge")
    assert losses.tolist() == pytest.approx([max(0, 1 - 0.5), max(0, 1 + 1.0)])  # [0.5, 2.0]


def test_unknown_loss_type_is_refused_by_name():
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(PC, PR, RC, RR, 0.1, loss_type="nope")


def test_personalized_loss_mixes_user_and_generic_terms_by_alpha_and_skips_unneeded_terms():
    user, generic = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 5.0])
    assert personalized_loss(user, generic, 0.5).tolist() == [2.0, 3.5]
    assert personalized_loss(user, generic, 0.25).tolist() == [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 5]
    assert personalized_loss(user, None, 1.0) is user  # generic term not needed
    assert personalized_loss(None, generic, 0.0) is generic  # user term not needed
    with pytest.raises(ValueError):
        personalized_loss(user, generic, 1.5)


def test_sequence_logps_sums_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 2, -100, 4]])  # scored: token 2 at position 1, token 4 at position 3
    lp = logits.log_softmax(-1)
    expected = lp[0, 0, 2] + lp[0, 2, 4]  # position t predicts token t + 1
    assert sequence_logps(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


def test_sft_term_is_the_mean_token_nll_of_chosen():
    # chosen log-probs -6 over 3 tokens and -2 over 0 tokens (clamped to 1)
    got = sft_term(torch.tensor([-6.0, -2.0]), torch.tensor([3, 0]))
    assert got.tolist() == pytest.approx([2.0, 2.0])


def test_draw_user_terms_takes_the_user_term_with_probability_alpha():
    torch.manual_seed(0)
    draws = draw_user_terms(20000, 0.7)
    assert draws.dtype == torch.bool and abs(draws.float().mean().item() - 0.7) < 0.02
    assert draw_user_terms(50, 1.0).all() and not draw_user_terms(50, 0.0).any()
    torch.manual_seed(3)
    first = draw_user_terms(8, 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, torch.rand(8) < 0.5)  # the global generator, as the Trainer seeds it

