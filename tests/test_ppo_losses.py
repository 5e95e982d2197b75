"""alignkit.losses.ppo against numbers derived by hand in each docstring."""

from __future__ import annotations

import pytest
import torch

from alignkit.losses.masks import whiten
from alignkit.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_penalised_rewards,
    last_token_index,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_by_hand_with_a_prompt_before_and_padding_after():
    """γ = 0.9, λ = 0.8, γλ = 0.72.

    Row 0: mask [0 1 1 1] (a prompt token first), r = [·, 0.1, 0.2, 1.0], V = [·, 0.5, 0.4, 0.3]
        t=3: δ = 1.0 + 0 − 0.3 = 0.7                      A = 0.7
        t=2: δ = 0.2 + 0.9·0.3 − 0.4 = 0.07               A = 0.07 + 0.72·0.7 = 0.574
        t=1: δ = 0.1 + 0.9·0.4 − 0.5 = −0.04              A = −0.04 + 0.72·0.574 = 0.37328
        R = A + V = [0, 0.87328, 0.974, 1.0]
    Row 1: mask [1 1 0 0], r = [0.5, 2, ·, 9 (garbage on padding)], V = [1, 1, 7, 7]
        t=1: δ = 2 + 0 − 1 = 1                             A = 1
        t=0: δ = 0.5 + 0.9·1 − 1 = 0.4                     A = 0.4 + 0.72·1 = 1.12
        R = [2.12, 2, 0, 0]
    """
    rewards = t([5.0, 0.1, 0.2, 1.0], [0.5, 2.0, 0.0, 9.0])
    values = t([3.0, 0.5, 0.4, 0.3], [1.0, 1.0, 7.0, 7.0])
    mask = t([0, 1, 1, 1], [1, 1, 0, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t([0, 0.37328, 0.574, 0.7], [1.12, 1.0, 0, 0]))
    torch.testing.assert_close(ret, t([0, 0.87328, 0.974, 1.0], [2.12, 2.0, 0, 0]))


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    """γ = λ = 1: A_t = Σ_{k≥t} r_k − V_t (Monte Carlo), R_t = Σ_{k≥t} r_k."""
    rewards, values, mask = t([1.0, 2.0, 3.0]), t([0.5, 0.5, 0.5]), t([1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([6.0, 5.0, 3.0]))
    torch.testing.assert_close(adv, t([5.5, 4.5, 2.5]))


def test_kl_penalised_rewards_pay_the_score_on_the_last_token():
    """logps [−1, −2, −3], ref [−1.5, −1, −3.5], mask [0 1 1], β = 0.1, score 2:
    k1 = [0 (prompt), −1, 0.5]; r = [0, 0.1, −0.05 + 2] = [0, 0.1, 1.95]."""
    logps, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -3.5])
    mask = t([0, 1, 1])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, t([0.0, -1.0, 0.5]))
    torch.testing.assert_close(rewards, t([0.0, 0.1, 1.95]))
    # No reference: the score alone, on the last token; a row with no completion token gets nothing.
    rewards, kl = kl_penalised_rewards(
        torch.tensor([2.0, 7.0]), t(*[[0.0] * 3] * 2), None, t([1, 1, 0], [0, 0, 0]), kl_coef=0.1
    )
    torch.testing.assert_close(rewards, t([0.0, 2.0, 0.0], [0.0, 0.0, 0.0]))
    assert last_token_index(t([1, 1, 0], [0, 0, 0])).tolist() == [1, -1]


def test_whiten_by_hand():
    """[1, 2, 3] on the mask (padding 100 ignored): mean 2, unbiased var 1 -> [−1, 0, 1]; keeping the
    mean -> [1, 2, 3]."""
    values, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    torch.testing.assert_close(whiten(values, mask, eps=0.0), t([-1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(whiten(values, mask, shift_mean=False, eps=0.0), t([1.0, 2.0, 3.0, 0.0]))


def test_clipped_value_loss_by_hand():
    """c = 0.2. Token 1: V 1.0, V_old 0.5, R 2.0: (V−R)² = 1; V_clip = 0.5 + 0.2 = 0.7, (0.7−2)² = 1.69
    -> ½·1.69 = 0.845, clipped term larger (no gradient: V_clip is constant in V there).
    Token 2: V 0, V_old 0.1, R 0.3: (0−0.3)² = 0.09; V_clip = 0.1 − 0.1 = 0 (inside the range) -> 0.045.
    Token 3 is padding. value_clip_frac = 1/2; value_error = (1 + 0.09)/2 = 0.545."""
    values = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    old, returns, mask = t([0.5, 0.1, 0.0]), t([2.0, 0.3, 0.0]), t([1, 1, 0])
    loss, metrics = clipped_value_loss(values, old, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(loss, t([0.845, 0.045, 0.0]))
    torch.testing.assert_close(metrics["value_clip_frac"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["value_error"], torch.tensor(0.545))
    loss[0, 0].backward()
    assert values.grad[0, 0] == 0  # the clip is active
    # No clipping: ½(V − R)².
    loss, metrics = clipped_value_loss(values, old, returns, mask, cliprange_value=None)
    torch.testing.assert_close(loss, t([0.5, 0.045, 0.0]))


def test_explained_variance_on_known_cases():
    """R = [1, 2, 3, 4] (unbiased var 5/3). V = R -> 1. V = 2.5 everywhere -> 0. V = R + [1, −1, 1, −1]:
    Var(R − V) = 4/3 -> 1 − (4/3)/(5/3) = 0.2."""
    returns, mask = t([1.0, 2.0, 3.0, 4.0]), t([1, 1, 1, 1])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)
    noisy = returns + t([1.0, -1.0, 1.0, -1.0])
    assert explained_variance(noisy, returns, mask).item() == pytest.approx(0.2)


def test_adaptive_kl_controller_by_hand_and_toward_its_target():
    """β 0.2, target 6, horizon 10,000, n = 256 sequences:
    KL 9   -> e = clip(0.5) = 0.2   -> β = 0.2·(1 + 0.2·0.0256) = 0.201024
    KL 3   -> e = clip(−0.5) = −0.2 -> β = 0.2·(1 − 0.00512) = 0.198976
    KL 6.6 -> e = 0.1               -> β = 0.2·(1 + 0.00256) = 0.200512"""
    for kl, expected in [(9.0, 0.201024), (3.0, 0.198976), (6.6, 0.200512)]:
        ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
        ctl.update(kl, 256)
        assert ctl.value == pytest.approx(expected)
    # A KL that stays above target keeps raising β; the state round-trips.
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=100)
    for _ in range(10):
        ctl.update(5.0, 10)
    assert ctl.value == pytest.approx(0.2 * 1.02**10)
    other = AdaptiveKLController(0.5, target=1.0, horizon=100)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
