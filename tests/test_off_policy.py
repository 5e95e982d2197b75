"""losses.off_policy: the importance weights π_old / π_sampler for a rollout drawn by a sampler that is not
the trainer, and their statistics, against numbers worked out by hand (masks and padding included)."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.losses.off_policy import SAMPLER_WEIGHTINGS, sampler_statistics, sampler_weights

LN2, LN3 = math.log(2.0), math.log(3.0)


def rollout_like():
    """Two completions, laid out (2, 4), right-padded: row 0 has 3 completion tokens, row 1 has 2 (its
    last two positions are padding, where both log-probs are garbage, -inf included).

    Δ = old − sampler per completion token:
        row 0:  ln 2, −ln 2, ln 2     -> token ratios 2, 1/2, 2;  Σ Δ = ln 2  -> sequence ratio 2
        row 1:  ln 2,  ln 2           -> token ratios 2, 2;       Σ Δ = 2 ln 2 -> sequence ratio 4
    """
    old = torch.tensor([[-1.0, -2.0, -1.0, 7.0], [-1.0, -1.0, float("-inf"), 5.0]])
    delta = torch.tensor([[LN2, -LN2, LN2, 0.0], [LN2, LN2, 0.0, 0.0]])
    sampler = old - delta
    sampler[1, 2:] = torch.tensor([0.0, float("nan")])  # padding: must not leak into any weight
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return old, sampler, mask


@pytest.mark.parametrize(
    ("mode", "cap", "expected", "units"),
    [
        # per token, min(r, C): at C = 1.5 every 2 becomes 1.5, the 1/2 stays
        ("token_truncate", 1.5, [[1.5, 0.5, 1.5, 0], [1.5, 1.5, 0, 0]], [2, 0.5, 2, 2, 2]),
        # per token, r where r <= C else 0: at C = 1.5 every 2 is dropped, the 1/2 kept
        ("token_mask", 1.5, [[0, 0.5, 0, 0], [0, 0, 0, 0]], [2, 0.5, 2, 2, 2]),
        # at C = 3 no token ratio (at most 2) is touched: the weights are the ratios themselves
        ("token_mask", 3.0, [[2, 0.5, 2, 0], [2, 2, 0, 0]], [2, 0.5, 2, 2, 2]),
        # per sequence, min(R, C) on every completion token: R = 2 and 4, C = 3 -> 2 and 3
        ("sequence_truncate", 3.0, [[2, 2, 2, 0], [3, 3, 0, 0]], [2, 4]),
        # per sequence, R where R <= C else 0: row 1 (R = 4 > 3) is dropped whole (TRL's default)
        ("sequence_mask", 3.0, [[2, 2, 2, 0], [0, 0, 0, 0]], [2, 4]),
    ],
)
def test_weights_per_mode_by_hand(mode, cap, expected, units):
    old, sampler, mask = rollout_like()
    weights, ratios = sampler_weights(old, sampler, mask, mode=mode, cap=cap)
    assert weights.shape == (2, 4)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(ratios, torch.tensor(units, dtype=torch.float32))
    assert not weights.requires_grad


def test_weights_are_detached_and_one_where_the_sampler_is_the_trainer():
    """Equal log-probs give weights exactly 1 on every completion token in every mode (Δ = 0 exactly), 0
    on padding; and no gradient flows back into either log-prob tensor."""
    old = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 0, 0, 0]])
    for mode in SAMPLER_WEIGHTINGS:
        weights, ratios = sampler_weights(old, old.detach().clone(), mask, mode=mode, cap=3.0)
        assert torch.equal(weights, mask.float())
        assert torch.equal(ratios, torch.ones_like(ratios))
        assert weights.grad_fn is None


def test_a_sequence_ratio_is_the_product_of_its_tokens_and_may_overflow_safely():
    """40 tokens with Δ = 3 each: R = e^120, beyond float32 (inf). Truncation gives C, masking 0 — never
    nan. A completion whose tokens cancel (Δ = +5, −5) has R = 1 whatever the cap."""
    old = torch.zeros(2, 40)
    sampler = torch.full((2, 40), -3.0)
    sampler[1] = 0.0
    sampler[1, :2] = torch.tensor([-5.0, 5.0])
    mask = torch.ones(2, 40)
    truncated, ratios = sampler_weights(old, sampler, mask, mode="sequence_truncate", cap=3.0)
    masked, _ = sampler_weights(old, sampler, mask, mode="sequence_mask", cap=3.0)
    assert math.isinf(ratios[0].item())
    torch.testing.assert_close(ratios[1], torch.tensor(1.0))
    assert torch.equal(truncated[0], torch.full((40,), 3.0)) and torch.equal(masked[0], torch.zeros(40))
    torch.testing.assert_close(truncated[1], torch.ones(40))
    torch.testing.assert_close(masked[1], torch.ones(40))


def test_statistics_by_hand():
    """The rollout above at C = 3:

    |Δ| on the 5 completion tokens: ln 2 each -> logp_diff/mean = logp_diff/max = ln 2 = 0.6931.
    k3 = e^Δ − 1 − Δ: Δ = ln 2 -> 2 − 1 − ln 2 = 0.3069 (four tokens); Δ = −ln 2 -> 1/2 − 1 + ln 2 = 0.1931
    (one token) -> kl = (4·0.3069 + 0.1931) / 5 = 0.2841.
    sequence_mask: R = 2 and 4 -> weights 2 and 0: mean 1, min 0, max 2; frac_masked = 1/2.
    token_truncate at C = 1.5: weights 1.5, 0.5, 1.5, 1.5, 1.5 -> mean 1.3, min 0.5, max 1.5; four of the
    five ratios exceed C -> frac_truncated = 0.8.
    """
    old, sampler, mask = rollout_like()
    log_ratios = (old - sampler)[mask.bool()]
    k3 = (4 * (1 - LN2) + (LN2 - 0.5)) / 5
    _, ratios = sampler_weights(old, sampler, mask, mode="sequence_mask", cap=3.0)
    stats = {k: v.item() for k, v in sampler_statistics(log_ratios, ratios, mode="sequence_mask").items()}
    assert stats == pytest.approx(
        {
            "logp_diff/mean": LN2,
            "logp_diff/max": LN2,
            "kl": k3,
            "weights/mean": 1.0,
            "weights/min": 0.0,
            "weights/max": 2.0,
            "frac_masked": 0.5,
        },
        abs=1e-6,
    )
    _, ratios = sampler_weights(old, sampler, mask, mode="token_truncate", cap=1.5)
    stats = sampler_statistics(log_ratios, ratios, mode="token_truncate", cap=1.5)
    assert {k: round(v.item(), 6) for k, v in stats.items() if k.startswith(("weights", "frac"))} == {
        "weights/mean": 1.3,
        "weights/min": 0.5,
        "weights/max": 1.5,
        "frac_truncated": 0.8,
    }
    # no correction: only the gap
    assert set(sampler_statistics(log_ratios)) == {"logp_diff/mean", "logp_diff/max", "kl"}


def test_bad_modes_and_caps_are_refused():
    old, sampler, mask = rollout_like()
    with pytest.raises(ValueError, match="sequence_mask"):
        sampler_weights(old, sampler, mask, mode="seq_mask", cap=3.0)
    with pytest.raises(ValueError, match="cap"):
        sampler_weights(old, sampler, mask, mode="token_mask", cap=0.0)
