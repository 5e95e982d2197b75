"""Online-RL maths in alignkit.losses.policy against numbers derived by hand: group advantages (GRPO, Dr.
GRPO, RLOO, REINFORCE++), the KL estimators (also checked by exact enumeration of a small distribution),
the clipped surrogate with clip-higher and its gradient, and the one loss aggregation, which must give the
whole batch's loss and gradient however the batch is split into micro-batches and processes."""

import math

import pytest
import torch

from alignkit.losses.entropy_tokens import entropy_threshold, high_entropy_mask
from alignkit.losses.policy import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    AdvantageSpec,
    aggregate,
    aggregation_units,
    compute_advantages,
    dr_grpo_advantages,
    frac_reward_zero_std,
    get_advantage,
    grpo_advantages,
    kl_estimate,
    kl_penalised_scores,
    reinforce_pp_advantages,
    rloo_advantages,
)
from alignkit.losses.policy_losses import clipped_surrogate


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0)


# Two prompts, G = 4 completions each, prompt-major.
REWARDS = t(1, 0, 0, 1, 2, 2, 2, 2)


# --- advantages ------------------------------------------------------------------------------------------


def test_grpo_group_scale_by_hand():
    """Group 1 [1, 0, 0, 1]: mean 0.5, deviations ±0.5, unbiased variance 4·0.25/3 = 1/3, std 0.577350;
    A = ±0.5 / (0.577350 + 1e-4) = ±0.865876. Group 2 [2, 2, 2, 2]: mean 2, std 0, A = 0/(0 + 1e-4) = 0."""
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert abs(a - 0.865876) < 1e-6
    close(grpo_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_std_is_unbiased():
    """[0, 2] (G = 2): mean 1, deviations ±1; the unbiased std is sqrt(2/1) = 1.414214 (the biased one
    would be 1), so A = ±1/(1.414214 + 1e-4) = ±0.707057, not ±0.9999."""
    close(grpo_advantages(t(0, 2), 2), [-0.707057, 0.707057])


def test_grpo_batch_scale_by_hand():
    """All 8 rewards: mean 10/8 = 1.25; squared deviations 2·0.25² + 2·1.25² + 4·0.75² = 0.125 + 3.125 +
    2.25 = 5.5; unbiased variance 5.5/7, std 0.886405. The numerator is still the group-centred reward:
    A = ±0.5 / (0.886405 + 1e-4) = ±0.564012 in group 1, 0 in group 2."""
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    assert abs(a - 0.564012) < 1e-6
    close(grpo_advantages(REWARDS, 4, scale="batch"), [a, -a, -a, a, 0, 0, 0, 0])


def test_dr_grpo_is_centred_rewards():
    """No division: A = r − group mean = [0.5, −0.5, −0.5, 0.5 | 0, 0, 0, 0]."""
    expected = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    close(dr_grpo_advantages(REWARDS, 4), expected)
    close(grpo_advantages(REWARDS, 4, scale="none"), expected)


def test_rloo_by_hand():
    """r = 1 in group 1: 1 − mean(0, 0, 1) = 1 − 1/3 = 2/3; r = 0: 0 − mean(1, 0, 1) = −2/3; equal to
    G/(G−1)·(r − mean) = 4/3·(±0.5). Group 2: 2 − 2 = 0. Uneven group [3, 0, 0] (G = 3): 3 − 0 = 3,
    0 − mean(3, 0) = −1.5, −1.5."""
    close(rloo_advantages(REWARDS, 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    close(rloo_advantages(t(3, 0, 0), 3), [3, -1.5, -1.5])


def test_reinforce_pp_baseline_by_hand():
    """G = 4: centred c = [0.5, −0.5, −0.5, 0.5 | 0, 0, 0, 0], mean 0, Σc² = 1, unbiased batch variance
    1/7, std 1/√7 = 0.377964; A = c·√7 = ±0.5·2.645751 = ±1.322876 (and 0 in group 2)."""
    a = 0.5 * math.sqrt(7)
    assert abs(a - 1.322876) < 1e-6
    close(reinforce_pp_advantages(REWARDS, 4), [a, -a, -a, a, 0, 0, 0, 0])


def test_reinforce_pp_single_completion_is_batch_zscore():
    """G = 1 (plain REINFORCE++): no group baseline, so the global z-score subtracts the batch mean 1.25
    and divides by the batch std 0.886405 (as in test_grpo_batch_scale_by_hand):
    1 -> −0.25/0.886405 = −0.282038, 0 -> −1.25/0.886405 = −1.410190, 2 -> 0.75/0.886405 = 0.846114."""
    lo, zero, hi = -0.282038, -1.410190, 0.846114
    close(reinforce_pp_advantages(REWARDS, 1), [lo, zero, zero, lo, hi, hi, hi, hi])


def test_frac_reward_zero_std():
    """G = 4: [1, 0, 0, 1] varies, [2, 2, 2, 2] does not -> 1/2. G = 2 on [1, 1 | 0, 1 | 3, 3] -> 2/3.
    Returned as a 0-dim tensor."""
    frac = frac_reward_zero_std(REWARDS, 4)
    assert frac.shape == () and not frac.requires_grad
    close(frac, 0.5)
    close(frac_reward_zero_std(t(1, 1, 0, 1, 3, 3), 2), 2 / 3)
    close(frac_reward_zero_std(t(0.5, 0.5, 0.5), 3), 1.0)


def test_unanimous_groups_give_zero_advantage_everywhere():
    for name in ADVANTAGES:
        adv = compute_advantages(name, t(2, 2, 2, 5, 5, 5), 3)
        assert torch.equal(adv, torch.zeros(6, dtype=torch.float64)), name


def test_integer_rewards_are_accepted():
    close(grpo_advantages(torch.tensor([1, 0, 0, 1]), 4), grpo_advantages(t(1, 0, 0, 1), 4), atol=1e-6)


def test_bad_layouts_raise():
    with pytest.raises(ValueError, match="group_size=1 but it needs at least 2"):
        rloo_advantages(t(1, 2, 3), 1)
    with pytest.raises(ValueError, match="group_size=1 but it needs at least 2"):
        grpo_advantages(t(1, 2, 3), 1)
    with pytest.raises(ValueError, match="7 rewards are not a whole number of groups of 4"):
        grpo_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="must be 1-D"):
        rloo_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="unknown scale 'groups'.*group, batch, none"):
        grpo_advantages(REWARDS, 4, scale="groups")
    with pytest.raises(ValueError, match="at least 2 rewards"):
        reinforce_pp_advantages(t(1.0), 1)


# --- the advantage registry ------------------------------------------------------------------------------


def test_registry_entries():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "reinforce_pp"}
    assert all(isinstance(s, AdvantageSpec) for s in ADVANTAGES.values())
    assert {k: s.default_aggregation for k, s in ADVANTAGES.items()} == {
        "grpo": "sequence_mean",
        "dr_grpo": "constant",
        "rloo": "constant",
        "reinforce_pp": "token_mean",
    }
    assert all(s.default_aggregation in AGGREGATIONS for s in ADVANTAGES.values())
    assert {k: s.min_group_size for k, s in ADVANTAGES.items()} == {
        "grpo": 2,
        "dr_grpo": 2,
        "rloo": 2,
        "reinforce_pp": 1,
    }
    with pytest.raises(AttributeError):
        ADVANTAGES["grpo"].min_group_size = 1  # frozen


def test_where_each_recipe_puts_the_kl():
    """RLOO (Ahmadian et al. 2024; TRL's RLOOTrainer) and plain REINFORCE++ (G = 1) subtract β·Σk1 from the
    reward; REINFORCE++-baseline (G > 1, OpenRLHF's recipe) and GRPO add a KL loss term, k2 and k3."""
    in_reward = {(k, G): s.kl_in_reward(G) for k, s in ADVANTAGES.items() for G in (1, 4)}
    assert in_reward == {
        ("grpo", 1): False,
        ("grpo", 4): False,
        ("dr_grpo", 1): False,
        ("dr_grpo", 4): False,
        ("rloo", 1): True,
        ("rloo", 4): True,
        ("reinforce_pp", 1): True,
        ("reinforce_pp", 4): False,
    }
    assert {k: s.kl_loss_estimator for k, s in ADVANTAGES.items()} == {
        "grpo": "k3",
        "dr_grpo": "k3",
        "rloo": "k3",
        "reinforce_pp": "k2",
    }


def test_compute_advantages_dispatches():
    close(compute_advantages("grpo", REWARDS, 4), grpo_advantages(REWARDS, 4))
    close(compute_advantages("grpo", REWARDS, 4, scale="batch"), grpo_advantages(REWARDS, 4, scale="batch"))
    close(compute_advantages("dr_grpo", REWARDS, 4), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(compute_advantages("rloo", REWARDS, 4), rloo_advantages(REWARDS, 4))
    close(compute_advantages("reinforce_pp", REWARDS, 4), reinforce_pp_advantages(REWARDS, 4))


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'grop'\. Did you mean 'grpo'\?"):
        get_advantage("grop")
    with pytest.raises(ValueError, match="Valid: dr_grpo, grpo, reinforce_pp, rloo"):
        compute_advantages("ppo_gae", REWARDS, 4)
    for name in ("dr_grpo", "rloo", "reinforce_pp"):
        with pytest.raises(ValueError, match=f"'{name}' does not use 'scale'"):
            compute_advantages(name, REWARDS, 4, scale="group")
    with pytest.raises(ValueError, match="'rloo' needs group_size >= 2"):
        compute_advantages("rloo", REWARDS, 1)


# --- KL estimators ---------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    """x = logps − ref_logps = [0.5, −0.5, 0, 1]:
    k1 = x; k2 = x²/2 = [0.125, 0.125, 0, 0.5];
    k3 = exp(−x) − 1 + x = [0.606531 − 0.5, 1.648721 − 1.5, 0, 0.367879] = [0.106531, 0.148721, 0, 0.367879]."""
    ref = t(0.0, 0.0, -1.0, -2.0).view(1, 4)
    logps = ref + t(0.5, -0.5, 0.0, 1.0).view(1, 4)
    close(kl_estimate(logps, ref, estimator="k1"), [[0.5, -0.5, 0, 1]])
    close(kl_estimate(logps, ref, estimator="k2"), [[0.125, 0.125, 0, 0.5]])
    close(kl_estimate(logps, ref, estimator="k3"), [[0.106531, 0.148721, 0, 0.367879]])
    close(kl_estimate(logps, ref), [[0.106531, 0.148721, 0, 0.367879]])  # k3 is the default


def test_kl_importance_weighted_by_hand():
    """With old_logps = logps − [0.1, −0.2, 0, ln 2], weights w = exp(logps − old) = [1.105171, 0.818731, 1, 2]:
    k3·w = [0.106531·1.105171, 0.148721·0.818731, 0, 0.367879·2] = [0.117735, 0.121762, 0, 0.735759]. The
    weight is π/π_old with π in the graph (DeepSeek-V3.2; TRL's use_bias_correction_kl), so
    d(w·k3)/d logps = w·k3 + w·(1 − e^(−x)) = w·(e^(−x) − 1 + x + 1 − e^(−x)) = w·x
    = [0.552585, −0.409365, 0, 2]. k2's weight is detached (its plain gradient is the unbiased one):
    d(w·x²/2)/d logps = w·x = the same numbers; k1's is in the graph: d(w·x)/d logps = w·(x + 1)."""
    ref = t(0.0, 0.0, -1.0, -2.0).view(1, 4)
    x = t(0.5, -0.5, 0.0, 1.0)
    w = t(1.105171, 0.818731, 1, 2)
    expected_grad = {"k3": w * x, "k2": w * x, "k1": w * (x + 1)}
    for estimator, grad in expected_grad.items():
        logps = (ref + x.view(1, 4)).requires_grad_()
        old = logps.detach() - t(0.1, -0.2, 0.0, math.log(2)).view(1, 4)
        kl = kl_estimate(logps, ref, estimator=estimator, old_logps=old)
        if estimator == "k3":
            close(kl, [[0.117735, 0.121762, 0, 0.735759]])
        kl.sum().backward()
        close(logps.grad, grad.view(1, 4), atol=1e-5)


def test_k3_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    logps = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
    ref = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(64, 32, generator=g, dtype=torch.float64)
    assert (kl_estimate(logps, ref, estimator="k3") >= 0).all()
    assert (kl_estimate(logps, ref, estimator="k3", old_logps=old) >= 0).all()
    assert (kl_estimate(logps, ref, estimator="k2") >= 0).all()
    assert (kl_estimate(logps, ref, estimator="k1") < 0).any()  # k1 is not


def _categoricals():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_()
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    old = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    return logits, ref, old


def test_kl_estimators_exact_expectations():
    """Over a 6-outcome distribution, an expectation is an exact sum. E_π[k1] = E_π[k3] = KL(π‖π_ref)
    (unbiased); E_π[k2] ≠ KL (biased); with samples from π_old, E_π_old[w·k3] = KL(π‖π_ref)."""
    logits, ref, old = _categoricals()
    logp = torch.log_softmax(logits, 0).detach()
    p, p_old = logp.exp(), old.exp()
    true_kl = (p * (logp - ref)).sum()
    close((p * kl_estimate(logp, ref, estimator="k1")).sum(), true_kl, atol=1e-12)
    close((p * kl_estimate(logp, ref, estimator="k3")).sum(), true_kl, atol=1e-12)
    assert abs((p * kl_estimate(logp, ref, estimator="k2")).sum() - true_kl) > 1e-3
    weighted = (p_old * kl_estimate(logp, ref, estimator="k3", old_logps=old)).sum()
    close(weighted, true_kl, atol=1e-12)


def test_kl_estimators_exact_gradients():
    """As loss terms on samples from π (expectation with π held fixed, as sampling does): the gradient of k2
    is ∇KL(π‖π_ref), that of k3 is ∇KL(π_ref‖π), that of k1 is 0 — the docstring's claims."""
    logits, ref, _ = _categoricals()

    def expected_grad(estimator):
        logp = torch.log_softmax(logits, 0)
        (grad,) = torch.autograd.grad(
            (logp.exp().detach() * kl_estimate(logp, ref, estimator=estimator)).sum(), logits
        )
        return grad

    logp = torch.log_softmax(logits, 0)
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)
    (forward,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), logits)
    close(expected_grad("k2"), reverse, atol=1e-12)
    close(expected_grad("k3"), forward, atol=1e-12)
    close(expected_grad("k1"), torch.zeros(6), atol=1e-12)
    assert (reverse - forward).abs().max() > 1e-3  # the two claims are distinguishable


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("sampler", ["off_policy", "on_policy"])
def test_importance_corrected_kl_has_the_reverse_kl_gradient(estimator, sampler):
    """With the correction, every estimator's expected gradient on samples from the sampling policy q is
    exactly ∇KL(π‖π_ref), the KL the penalty names (DeepSeek-V3.2's unbiased KL estimate; TRL's
    use_bias_correction_kl), whether q is another distribution (a reused rollout) or π itself (q = π with
    no gradient: the first update). Exact: E_q[g(y)] = Σ_y q(y)·g(y) over the 6 outcomes, q held fixed.
    Without the correction k3's expected gradient is ∇KL(π_ref‖π) (test above), a different vector."""
    logits, ref, old = _categoricals()
    logp = torch.log_softmax(logits, 0)
    q_log = old if sampler == "off_policy" else logp.detach()
    estimate = kl_estimate(logp, ref, estimator=estimator, old_logps=q_log)
    (expected,) = torch.autograd.grad((q_log.exp() * estimate).sum(), logits, retain_graph=True)
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits)
    close(expected, reverse, atol=1e-12)


def test_kl_penalised_scores_by_hand():
    """x = logps − ref_logps per token, masked: row 0 [0.5, −0.2, (pad: 9, ignored)] sums to 0.3, row 1
    [0.1, 0.1, 0.3] to 0.5. β = 0.5: scores [1, 2] -> [1 − 0.15, 2 − 0.25] = [0.85, 1.75]."""
    ref = t(-1.0, -2.0, -3.0, -1.0, -1.0, -1.0).view(2, 3)
    logps = ref + t(0.5, -0.2, 9.0, 0.1, 0.1, 0.3).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    penalised, kl = kl_penalised_scores(t(1.0, 2.0), logps, ref, mask, beta=0.5)
    close(kl, [0.3, 0.5])
    close(penalised, [0.85, 1.75])


def test_the_kl_in_the_reward_has_the_reverse_kl_gradient():
    """In the reward, the KL reaches the policy through the score function: over one-token completions of a
    6-outcome π, E_π[r'(y)·∇log π(y)] with r' = 0 − β·k1(y) is exactly −β·∇KL(π‖π_ref) (Σ_y π·∇log π = 0)."""
    logits, ref, _ = _categoricals()
    logp = torch.log_softmax(logits, 0)
    penalised, _ = kl_penalised_scores(
        torch.zeros(6, dtype=torch.float64),
        logp.detach().view(6, 1),
        ref.view(6, 1),
        torch.ones(6, 1),
        beta=0.3,
    )
    (policy_gradient,) = torch.autograd.grad(
        (logp.exp().detach() * penalised * logp).sum(), logits, retain_graph=True
    )
    (reverse,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits)
    close(policy_gradient, -0.3 * reverse, atol=1e-12)


def test_unknown_kl_estimator():
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'. Valid: k1, k2, k3"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), estimator="k4")


# --- the clipped surrogate -------------------------------------------------------------------------------

# Row 0 has A = +1, row 1 has A = −1 (a (B,) advantage); three completion tokens each, then a padding token
# whose ratio 3 would count as clipped if the mask were ignored.
RATIOS = t(1.5, 1.25, 0.5, 3.0, 0.5, 1.5, 0.75, 3.0).view(2, 4)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
ADV = t(1.0, -1.0)


def _surrogate(ratios=RATIOS, **kwargs):
    old = torch.full_like(ratios, -1.0)
    logps = (old + ratios.log()).requires_grad_()
    loss, metrics = clipped_surrogate(logps, old, ADV, MASK, **kwargs)
    return logps, loss, metrics


def test_clip_higher_by_hand():
    """ε_low = 0.2, ε_high = 0.28, so clip(ρ) ∈ [0.8, 1.28]; loss = −min(ρA, clip(ρ)A).
    A = +1: ρ 1.5  -> −min(1.5, 1.28)  = −1.28  (high clip active)
            ρ 1.25 -> −min(1.25, 1.25) = −1.25  (inside [0.8, 1.28])
            ρ 0.5  -> −min(0.5, 0.8)   = −0.5   (below, but A > 0: unclipped term is the min, not clipped)
    A = −1: ρ 0.5  -> −min(−0.5, −0.8) = 0.8    (low clip active)
            ρ 1.5  -> −min(−1.5, −1.28)= 1.5    (above, but A < 0: not clipped)
            ρ 0.75 -> −min(−0.75, −0.8)= 0.8    (low clip active)
    Padding -> 0. clip_frac/high = 1/6, clip_frac/low = 2/6, clip_frac = 1/2; ratio/mean = 6/6 = 1.
    approx_kl = mean of (ρ−1) − ln ρ: 1.5 -> 0.094535 (×2), 1.25 -> 0.026856, 0.5 -> 0.193147 (×2),
    0.75 -> 0.037682; sum 0.639902, mean 0.106650."""
    _, loss, m = _surrogate(epsilon=0.2, epsilon_high=0.28)
    close(loss, [[-1.28, -1.25, -0.5, 0], [0.8, 1.5, 0.8, 0]])
    close(m["clip_frac/high"], 1 / 6)
    close(m["clip_frac/low"], 2 / 6)
    close(m["clip_frac"], 0.5)
    close(m["ratio/mean"], 1.0)
    close(m["approx_kl"], 0.106650)
    for v in m.values():
        assert v.shape == () and not v.requires_grad


def test_symmetric_clip_by_hand():
    """ε_high = ε = 0.2, clip(ρ) ∈ [0.8, 1.2]: A = +1, ρ 1.25 is now clipped too: −min(1.25, 1.2) = −1.2,
    and ρ 1.5 gives −1.2. Row 1 is unchanged. clip_frac/high = 2/6, clip_frac/low = 2/6."""
    _, loss, m = _surrogate(epsilon=0.2)
    close(loss, [[-1.2, -1.2, -0.5, 0], [0.8, 1.5, 0.8, 0]])
    close(m["clip_frac/high"], 2 / 6)
    close(m["clip_frac/low"], 2 / 6)
    close(m["clip_frac"], 4 / 6)


def test_surrogate_gradient_by_hand():
    """d loss / d logps = −A·ρ where the unclipped term is the minimum, 0 where the clip is active:
    row 0: [0 (clipped), −1.25, −0.5, 0 (pad)]; row 1: [0 (clipped), +1.5, 0 (clipped), 0 (pad)]."""
    logps, loss, _ = _surrogate(epsilon=0.2, epsilon_high=0.28)
    loss.sum().backward()
    close(logps.grad, [[0, -1.25, -0.5, 0], [0, 1.5, 0, 0]])


def test_surrogate_gradient_matches_finite_differences():
    """Random ratios away from the clip kinks, (B, T) advantages of both signs: autograd vs central
    differences of the summed loss."""
    g = torch.Generator().manual_seed(2)
    ratios = torch.tensor([0.5, 0.7, 0.9, 1.1, 1.4, 1.6], dtype=torch.float64)
    ratios = ratios[torch.randint(0, 6, (3, 5), generator=g)]
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0

    def f(logps):
        return clipped_surrogate(logps, old, adv, mask, epsilon=0.2, epsilon_high=0.28)[0]

    assert torch.autograd.gradcheck(f, ((old + ratios.log()).requires_grad_(),))


def test_ratio_one_is_minus_advantage():
    """logps == old_logps: ρ = 1 everywhere, so loss = −A on every completion token (0 on padding), no
    clipping, approx_kl 0, ratio/mean 1; with (B,) or the equivalent (B, T) advantages."""
    g = torch.Generator().manual_seed(3)
    logps = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 4
    adv = t(0.7, -1.3, 2.0)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0]])
    loss, m = clipped_surrogate(logps, logps.clone(), adv, mask)
    close(loss, -adv.view(3, 1) * mask)
    loss_bt, _ = clipped_surrogate(logps, logps.clone(), adv.view(3, 1).expand(3, 5), mask)
    close(loss_bt, loss)
    for k in ("clip_frac/low", "clip_frac/high", "clip_frac", "approx_kl"):
        close(m[k], 0.0)
    close(m["ratio/mean"], 1.0)


def test_padding_with_non_finite_logps_is_zero():
    logps = torch.tensor([[-1.0, float("-inf")]])
    loss, m = clipped_surrogate(
        logps, torch.tensor([[-1.0, -2.0]]), torch.tensor([1.0]), torch.tensor([[1, 0]])
    )
    assert torch.equal(loss, torch.tensor([[-1.0, 0.0]]))
    assert all(torch.isfinite(v) for v in m.values())


def test_bad_epsilon():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="epsilon=1.5 must be in"):
        clipped_surrogate(z, z, torch.zeros(1), z, epsilon=1.5)
    with pytest.raises(ValueError, match="epsilon_high=0.0 must be > 0"):
        clipped_surrogate(z, z, torch.zeros(1), z, epsilon_high=0.0)


# --- aggregation -----------------------------------------------------------------------------------------


def test_aggregate_by_hand():
    """ℓ = [[1, 2, 3, 9], [4, 0, 0, 9]], mask = [[1, 1, 1, 0], [1, 0, 0, 0]] (9s are padding):
    token_mean    = (1+2+3+4)/4 = 2.5,           units 4
    sequence_mean = ((1+2+3)/3 + 4/1)/2 = 3,     units 2
    constant, L=5 = (1+2+3+4)/(5·2) = 1,         units 2"""
    loss = t(1, 2, 3, 9, 4, 0, 0, 9).view(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    for mode, value, units in [("token_mean", 2.5, 4), ("sequence_mean", 3.0, 2), ("constant", 1.0, 2)]:
        out, n = aggregate(loss, mask, mode=mode, max_completion_length=5)
        close(out, value)
        close(n, float(units))
        close(aggregation_units(mask, mode=mode), float(units))
        assert n.shape == ()


def test_aggregate_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'. Valid: token_mean, sequence_mean"):
        aggregate(z, z, mode="mean")
    with pytest.raises(ValueError, match="'constant' needs max_completion_length"):
        aggregate(z, z, mode="constant")


# Micro-batches of one step, grouped by process: sizes of different lengths so weights are not equal.
SPLITS = {
    "one micro-batch": [[9]],
    "accumulation": [[1, 3, 5]],
    "two processes": [[2, 3], [4]],
    "three processes": [[1, 1], [5], [2]],
}


@pytest.mark.parametrize("top_entropy", [None, 0.3], ids=["all tokens", "top-entropy tokens"])
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("split", SPLITS)
def test_aggregation_is_invariant_to_the_split(mode, split, top_entropy):
    """training.step.optimizer_step scales micro-batch m's loss by W·units_m / U (U: units of the whole step on
    all W processes) and DDP averages gradients over processes, so the step's objective is
    Σ_m units_m/U · loss_m. It must equal the whole batch's aggregate, in value and gradient.

    With `top_entropy_fraction` the per-token loss is masked to the step's high-entropy tokens: the
    threshold is taken once over the whole step (`losses.entropy_tokens`), so the mask, and with it the
    loss, does not depend on the split either (a per-micro-batch threshold would: see the next test)."""
    g = torch.Generator().manual_seed(4)
    B, T, L = 9, 6, 6
    x = torch.randn(B, T, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.rand(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([1, 6, 3, 2, 5, 4, 6, 1, 2])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    mask[2, 0] = False  # a prompt token inside the row: masks need not be prefixes
    keep = torch.ones(B, T, dtype=torch.float64)
    if top_entropy is not None:
        entropy = torch.rand(B, T, generator=g)
        keep = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask], top_entropy)).double()
        assert 0 < keep.sum() < mask.sum()

    def per_token(rows):
        # a non-linear function of a leaf, so gradients differ per token
        return weight[rows] * x[rows] ** 2 * keep[rows]

    whole, _ = aggregate(per_token(slice(None)), mask, mode=mode, max_completion_length=L)
    (whole_grad,) = torch.autograd.grad(whole, x)

    processes, start = [], 0
    for sizes in SPLITS[split]:
        rows = []
        for n in sizes:
            rows.append(slice(start, start + n))
            start += n
        processes.append(rows)
    assert start == B
    # optimizer_step turns units into Python numbers (float64) before scaling; so does this test.
    U = sum(aggregation_units(mask[r], mode=mode).double() for rows in processes for r in rows)
    W = len(processes)
    total = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(x)
    for rows in processes:
        process_grad = torch.zeros_like(x)
        for r in rows:
            loss_m, units_m = aggregate(per_token(r), mask[r], mode=mode, max_completion_length=L)
            scaled = loss_m * (W * units_m.double() / U)
            (g_m,) = torch.autograd.grad(scaled, x)
            process_grad += g_m
            total = total + scaled.detach() / W
        grad += process_grad / W  # DDP's all-reduce mean
    close(total, whole.detach(), atol=1e-12)
    close(grad, whole_grad, atol=1e-12)
    assert whole_grad.abs().sum() > 0


def test_a_per_micro_batch_entropy_threshold_would_depend_on_the_split():
    """The guard of the split test's top-entropy case: the top 30% of each micro-batch's tokens are not the top
    30% of the step's, so thresholds taken per micro-batch change which tokens train with the split."""
    g = torch.Generator().manual_seed(4)
    entropy = torch.rand(9, 6, generator=g)
    mask = torch.ones(9, 6, dtype=torch.bool)
    whole = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask], 0.3))
    per_micro = torch.cat(
        [
            high_entropy_mask(entropy[r], mask[r], entropy_threshold(entropy[r][mask[r]], 0.3))
            for r in (slice(0, 1), slice(1, 4), slice(4, 9))
        ]
    )
    assert not torch.equal(whole, per_micro)


def test_aggregations_differ():
    """The three modes weigh tokens differently (a guard that the split test above is not vacuous)."""
    loss = t(1, 2, 3, 4, 5, 0).view(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    values = {m: aggregate(loss, mask, mode=m, max_completion_length=3)[0] for m in AGGREGATIONS}
    close(values["token_mean"], 10 / 4)
    close(values["sequence_mean"], (6 / 3 + 4) / 2)
    close(values["constant"], 10 / 6)
