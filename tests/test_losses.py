"""Preference losses against numbers derived by hand."""

import math

import pytest
import torch

from alignkit.losses import LOSSES, preference_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# chosen -1, rejected -3, reference -2 for both: chosen ratio +1, rejected ratio -1, h = 2.
POLICY = dict(
    chosen_logps=t(-1.0), rejected_logps=t(-3.0), ref_chosen_logps=t(-2.0), ref_rejected_logps=t(-2.0)
)


@pytest.mark.parametrize(
    "beta, label_smoothing, preference, expected",
    [
        # β=0.5: βh = 1. loss = -log σ(1) = log(1 + e^-1) = 0.313261687518
        (0.5, 0.0, None, math.log1p(math.exp(-1))),
        # β=0.1: βh = 0.2. loss = log(1 + e^-0.2) = 0.598138869382
        (0.1, 0.0, None, math.log1p(math.exp(-0.2))),
        # cDPO ε=0.1, βh=1: -(0.9 log σ(1) + 0.1 log σ(-1)); log σ(-x) = log σ(x) - x, so
        # loss = log(1+e^-1) + 0.1·1 = 0.413261687518
        (0.5, 0.1, None, math.log1p(math.exp(-1)) + 0.1),
        # soft label p=0.7, βh=1: loss = log(1+e^-1) + 0.3·1 = 0.613261687518
        (0.5, 0.0, 0.7, math.log1p(math.exp(-1)) + 0.3),
        # soft p=0.7 with ε=0.2: p' = 0.8·0.7 + 0.2·0.3 = 0.62; βh = 0.2:
        # loss = log(1+e^-0.2) + 0.38·0.2 = 0.674138869382
        (0.1, 0.2, 0.7, math.log1p(math.exp(-0.2)) + 0.38 * 0.2),
    ],
)
def test_sigmoid_dpo_by_hand(beta, label_smoothing, preference, expected):
    pref = None if preference is None else t(preference)
    out = preference_loss("sigmoid", **POLICY, beta=beta, label_smoothing=label_smoothing, preference=pref)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * 1.0)
    assert out.rejected_rewards.item() == pytest.approx(beta * -1.0)


def test_soft_label_one_is_plain_dpo_and_half_has_no_gradient_at_zero_margin():
    chosen = t(-1.0, -4.0).requires_grad_()
    plain = preference_loss("sigmoid", chosen, t(-3.0, -2.0), t(-2.0, -2.5), t(-2.0, -1.0), beta=0.3)
    soft = preference_loss(
        "sigmoid", chosen, t(-3.0, -2.0), t(-2.0, -2.5), t(-2.0, -1.0), beta=0.3, preference=t(1.0, 1.0)
    )
    torch.testing.assert_close(plain.losses, soft.losses)
    # p = 0.5 at h = 0: d loss / d h = β(σ(βh) − p) = 0
    h0 = t(-2.0).requires_grad_()
    out = preference_loss("sigmoid", h0, t(-2.0), t(-2.0), t(-2.0), beta=0.3, preference=t(0.5))
    out.losses.sum().backward()
    assert h0.grad.item() == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    preference_loss("sigmoid", chosen, rejected, t(-2.0), t(-2.0), beta=0.1).losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preference loss 'sigmoud'.*Did you mean 'sigmoid'"):
        preference_loss("sigmoud", t(-1.0), t(-2.0), t(-1.0), t(-1.0))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", t(-1.0), t(-2.0))
    assert LOSSES["sigmoid"].needs_reference
