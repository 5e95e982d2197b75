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
    plain = preference_loss(
        "sigmoid", chosen, t(-3.0, -2.0), t(-2.0, -2.5), ref_rejected_logps=t(-2.0, -1.0), beta=0.3
    )
    soft = preference_loss(
        "sigmoid",
        chosen,
        t(-3.0, -2.0),
        t(-2.0, -2.5),
        ref_rejected_logps=t(-2.0, -1.0),
        beta=0.3,
        preference=t(1.0, 1.0),
    )
    torch.testing.assert_close(plain.losses, soft.losses)
    # p = 0.5 at h = 0: d loss / d h = β(σ(βh) − p) = 0
    h0 = t(-2.0).requires_grad_()
    out = preference_loss(
        "sigmoid", h0, t(-2.0), t(-2.0), ref_rejected_logps=t(-2.0), beta=0.3, preference=t(0.5)
    )
    out.losses.sum().backward()
    assert h0.grad.item() == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen, rejected = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    preference_loss(
        "sigmoid", chosen, rejected, t(-2.0), ref_rejected_logps=t(-2.0), beta=0.1
    ).losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


def test_registry_errors_are_clear():
    with pytest.raises(ValueError, match="unknown preference loss 'sigmoud'.*Did you mean 'sigmoid'"):
        preference_loss("sigmoud", t(-1.0), t(-2.0), t(-1.0), ref_rejected_logps=t(-1.0))
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss("sigmoid", t(-1.0), t(-2.0))
    assert LOSSES["sigmoid"].needs_reference


def test_check_params_defaults_to_the_paired_registry_and_checks_any_other():
    from alignkit.losses import LISTWISE_LOSSES, UNPAIRED_LOSSES, check_params

    check_params("sigmoid", {"beta": 0.1, "label_smoothing": 0.2})
    check_params("kto", {"beta": 0.1, "desirable_weight": 1.33}, UNPAIRED_LOSSES)
    with pytest.raises(ValueError, match="unknown preference loss 'kto'. Valid: bco_pair, cpo"):
        check_params("kto", {})  # unpaired: not in the default (paired) registry
    with pytest.raises(ValueError, match=r"unknown loss 'sigmoid'. Valid: bco, kto$"):
        check_params("sigmoid", {}, UNPAIRED_LOSSES)
    with pytest.raises(ValueError, match=r"loss 'soft' does not use 'gamma' \(its parameters: beta\)"):
        check_params("soft", {"gamma": 1.0}, LISTWISE_LOSSES)
    with pytest.raises(
        ValueError, match=r"loss 'bco': desirable_weight=-1 is not valid \(expected a number >= 0\)"
    ):
        check_params("bco", {"desirable_weight": -1}, UNPAIRED_LOSSES)


# ---------------------------------------------------------------------------------------------
# every registered objective against hand-derived numbers
#
# ℓ(z) = −log σ(z) = log(1 + e^−z); ℓ(−z) = ℓ(z) + z.


def ell(z):
    return math.log1p(math.exp(-z))


@pytest.mark.parametrize(
    "beta, eps, expected",
    [
        # h = 2. rDPO: [(1−ε)ℓ(βh) − ε·ℓ(−βh)]/(1−2ε) = [(1−2ε)ℓ(βh) − ε·βh]/(1−2ε) = ℓ(βh) − ε·βh/(1−2ε)
        (0.5, 0.0, ell(1.0)),  # ε = 0: plain DPO, 0.313261687518
        (0.5, 0.1, ell(1.0) - 0.1 * 1.0 / 0.8),  # 0.313261687518 − 0.125 = 0.188261687518
        (0.1, 0.2, ell(0.2) - 0.2 * 0.2 / 0.6),  # 0.598138869382 − 0.0666… = 0.531472202715
    ],
)
def test_robust_dpo_by_hand(beta, eps, expected):
    out = preference_loss("robust", **POLICY, beta=beta, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta) and out.rejected_rewards.item() == pytest.approx(
        -beta
    )


def test_robust_dpo_is_unbiased_under_label_noise():
    """E over a flip with probability ε of the rDPO loss = the clean DPO loss (Chowdhury et al. 2024)."""
    eps, beta = 0.3, 0.7
    clean = preference_loss("sigmoid", **POLICY, beta=beta).losses
    as_labelled = preference_loss("robust", **POLICY, beta=beta, label_smoothing=eps).losses
    swapped = dict(
        chosen_logps=POLICY["rejected_logps"],
        rejected_logps=POLICY["chosen_logps"],
        ref_chosen_logps=POLICY["ref_rejected_logps"],
        ref_rejected_logps=POLICY["ref_chosen_logps"],
    )
    flipped = preference_loss("robust", **swapped, beta=beta, label_smoothing=eps).losses
    torch.testing.assert_close((1 - eps) * as_labelled + eps * flipped, clean)


@pytest.mark.parametrize(
    "beta, expected",
    [
        (0.25, 0.5),  # h = 2: max(0, 1 − 0.5) = 0.5
        (0.1, 0.8),  # max(0, 1 − 0.2)
        (1.0, 0.0),  # max(0, 1 − 2): past the margin, no loss
    ],
)
def test_hinge_slic_by_hand(beta, expected):
    out = preference_loss("hinge", **POLICY, beta=beta)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)


# Length-normalised inputs: chosen sum −4 over 2 tokens (mean −2), reference −6 (mean −3): ratio +1;
# rejected sum −12 over 4 tokens (mean −3), reference −8 (mean −2): ratio −1. Per-token h = 2
# (with sums it would be (−4 + 6) − (−12 + 8) = 6).
LENGTHS = dict(
    chosen_logps=t(-4.0),
    rejected_logps=t(-12.0),
    ref_chosen_logps=t(-6.0),
    ref_rejected_logps=t(-8.0),
    chosen_lengths=t(2.0),
    rejected_lengths=t(4.0),
)


@pytest.mark.parametrize(
    "beta, expected",
    [
        (0.5, 1.0),  # (h − 1/(2β))² = (2 − 1)²; with sums it would be (6 − 1)² = 25
        (0.1, 9.0),  # (2 − 5)²
        (0.25, 0.0),  # (2 − 2)²: at IPO's target
    ],
)
def test_ipo_by_hand_uses_per_token_log_ratios(beta, expected):
    out = preference_loss("ipo", **LENGTHS, beta=beta)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * 1.0)  # β · per-token log-ratio
    assert LOSSES["ipo"].length_normalised


# GPO members f(βh) at h = 2: β = 0.25 gives x = 0.5, β = 1 gives x = 2.
GPO_BY_HAND = {
    "gpo_logistic": (math.log1p(math.exp(-0.5)), math.log1p(math.exp(-2.0))),  # log(1 + e^−x)
    "gpo_hinge": (0.5, 0.0),  # max(0, 1 − x)
    "gpo_squared": (0.25, 1.0),  # (x − 1)²
    "gpo_exponential": (math.exp(-0.5), math.exp(-2.0)),  # e^−x: 0.606530659713, 0.135335283237
    "gpo_truncated_quadratic": (0.25, 0.0),  # max(0, 1 − x)²
    "gpo_savage": (1 / (1 + math.exp(0.5)) ** 2, 1 / (1 + math.exp(2.0)) ** 2),  # 0.142536957, 0.014209337
}


@pytest.mark.parametrize("name", sorted(GPO_BY_HAND))
def test_gpo_family_by_hand(name):
    for beta, expected in zip((0.25, 1.0), GPO_BY_HAND[name]):
        out = preference_loss(name, **POLICY, beta=beta)
        assert out.losses.item() == pytest.approx(expected, abs=1e-12), beta
    assert {n for n in LOSSES if n.startswith("gpo_")} == set(GPO_BY_HAND)


def test_gpo_logistic_is_sigmoid_dpo_and_gpo_hinge_is_slic():
    g = torch.Generator().manual_seed(0)
    logps = [-10 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(4)]
    pair = dict(zip(("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"), logps))
    for beta in (0.1, 0.7):
        torch.testing.assert_close(
            preference_loss("gpo_logistic", **pair, beta=beta).losses,
            preference_loss("sigmoid", **pair, beta=beta).losses,
        )
        torch.testing.assert_close(
            preference_loss("gpo_hinge", **pair, beta=beta).losses,
            preference_loss("hinge", **pair, beta=beta).losses,
        )


@pytest.mark.parametrize(
    "beta, delta, expected",
    [
        # r_w = β·1 = 0.5, r_l = −0.5. loss = ℓ(r_w − δ) + ℓ(−(r_l − δ))
        (0.5, 0.0, 2 * math.log1p(math.exp(-0.5))),  # 2ℓ(0.5) = 0.948153968
        (0.5, 0.5, math.log(2) + math.log1p(math.exp(-1.0))),  # ℓ(0) + ℓ(1) = 1.006408868
        (0.1, -0.5, math.log1p(math.exp(-0.6)) + math.log1p(math.exp(0.4))),  # ℓ(0.6) + ℓ(−0.4)
    ],
)
def test_bco_pair_by_hand(beta, delta, expected):
    out = preference_loss("bco_pair", **POLICY, beta=beta, delta=delta)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["delta"] == delta


@pytest.mark.parametrize(
    "beta, nll_weight, expected",
    [
        # h = 2 on sums; the chosen sum −1 over 4 tokens: per-token NLL 0.25. loss = ℓ(βh) + α·0.25
        (0.5, 1.0, ell(1.0) + 0.25),  # 0.563261687518
        (0.1, 2.0, ell(0.2) + 0.5),  # 1.098138869382
        (0.1, 0.0, ell(0.2)),  # α = 0: sigmoid DPO
    ],
)
def test_rpo_by_hand(beta, nll_weight, expected):
    out = preference_loss(
        "rpo", **POLICY, chosen_lengths=t(4.0), rejected_lengths=t(3.0), beta=beta, nll_weight=nll_weight
    )
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["nll"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "beta, gamma, expected",
    [
        # per-token means: chosen −4/2 = −2, rejected −12/4 = −3. loss = ℓ(β·(−2 − (−3)) − γ) = ℓ(β − γ)
        (2.0, 1.0, ell(1.0)),  # the SimPO paper's β = 2, γ/β = 0.5
        (2.5, 0.5, ell(2.0)),
        (0.1, 0.5, ell(-0.4)),  # margin not yet reached: ℓ(−0.4) = ℓ(0.4) + 0.4
    ],
)
def test_simpo_by_hand(beta, gamma, expected):
    out = preference_loss("simpo", **LENGTHS, beta=beta, gamma=gamma)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(-2 * beta)  # β · mean log-prob
    assert out.rejected_rewards.item() == pytest.approx(-3 * beta)


@pytest.mark.parametrize(
    "beta, nll_weight, expected",
    [
        # sums: chosen −4 (2 tokens), rejected −12. loss = ℓ(β·(−4 + 12)) + α·(4 / 2)
        (0.1, 1.0, ell(0.8) + 2.0),  # 0.371100666 + 2
        (0.25, 0.5, ell(2.0) + 1.0),  # 1.126928011
    ],
)
def test_cpo_by_hand(beta, nll_weight, expected):
    out = preference_loss("cpo", **LENGTHS, beta=beta, nll_weight=nll_weight)
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["nll"] == pytest.approx(2.0)
    assert out.chosen_rewards.item() == pytest.approx(-4 * beta)


@pytest.mark.parametrize(
    "p_chosen, p_rejected, lam, expected",
    [
        # per-token P = exp(mean log-prob). P 1/2 -> odds 1, log odds 0; P 1/5 -> odds 1/4.
        # log odds ratio = log 4; −log σ(log 4) = log(1 + 1/4) = log 1.25; NLL = −log(1/2) = log 2.
        (0.5, 0.2, 0.1, math.log(2) + 0.1 * math.log(1.25)),  # 0.715461
        (0.5, 0.2, 1.0, math.log(2.5)),  # log 2 + log 1.25
        # P 0.8 -> odds 4; P 0.5 -> odds 1: ratio again log 4; NLL = −log 0.8 = log 1.25
        (0.8, 0.5, 0.5, 1.5 * math.log(1.25)),
    ],
)
def test_orpo_by_hand(p_chosen, p_rejected, lam, expected):
    # sums over 3 chosen and 2 rejected tokens whose per-token means are log P
    out = preference_loss(
        "orpo",
        t(3 * math.log(p_chosen)),
        t(2 * math.log(p_rejected)),
        chosen_lengths=t(3.0),
        rejected_lengths=t(2.0),
        beta=lam,
    )
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.metrics["log_odds_ratio"] == pytest.approx(math.log(4))
    assert out.metrics["nll"] == pytest.approx(-math.log(p_chosen))


def test_log1mexp_is_accurate_near_zero_and_far_below():
    from alignkit.losses.reference_free import log1mexp

    xs = [-1e-5, -1e-3, -0.5, -0.7, -1.0, -20.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32))
    expected = torch.tensor([math.log(-math.expm1(x)) for x in xs], dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert torch.isfinite(log1mexp(torch.tensor([0.0]))).all()  # probability 1: clamped, not inf


@pytest.mark.parametrize(
    "beta, margin, expected",
    [
        # ODPO: −log σ(βh − m), h = 2
        (0.5, 0.5, ell(0.5)),  # βh = 1 must beat m = 0.5
        (0.5, 3.0, ell(-2.0)),  # the margin is not met yet: large loss, 2.126928011
        (0.1, -1.0, ell(1.2)),
    ],
)
def test_reward_shaped_dpo_margin_by_hand(beta, margin, expected):
    out = preference_loss("sigmoid", **POLICY, beta=beta, margin=t(margin))
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    # the rewards stay the implicit rewards; the margin only shifts the logit
    assert out.chosen_rewards.item() == pytest.approx(beta)


def test_zero_margin_is_plain_dpo_and_soft_half_label_rests_at_the_margin():
    plain = preference_loss("sigmoid", **POLICY, beta=0.3)
    torch.testing.assert_close(
        preference_loss("sigmoid", **POLICY, beta=0.3, margin=t(0.0)).losses, plain.losses
    )
    # p = 0.5: the gradient with respect to h vanishes where βh = m (0.3·2 = 0.6)
    chosen = t(-1.0).requires_grad_()
    out = preference_loss(
        "sigmoid",
        chosen,
        t(-3.0),
        t(-2.0),
        ref_rejected_logps=t(-2.0),
        beta=0.3,
        preference=t(0.5),
        margin=t(0.6),
    )
    out.losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(0.0, abs=1e-15)


# Inputs some objectives need besides β (loop state, a flip rate that exercises the formula).
EXTRA = {"bco_pair": {"delta": 0.0}, "robust": {"label_smoothing": 0.1}}
LENGTH_ARGS = dict(chosen_lengths=t(2.0), rejected_lengths=t(2.0))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_objective_pushes_chosen_up_and_rejected_down(name):
    chosen, rejected = t(-2.0).requires_grad_(), t(-2.0).requires_grad_()
    out = preference_loss(
        name, chosen, rejected, t(-2.0), ref_rejected_logps=t(-2.0), **LENGTH_ARGS, **EXTRA.get(name, {})
    )
    out.losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent raises chosen, lowers rejected


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_objective_gradient_matches_finite_differences(name):
    g = torch.Generator().manual_seed(1)
    logps = [(-1 - 9 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    lengths = dict(chosen_lengths=t(3, 5, 2, 7, 4), rejected_lengths=t(6, 2, 3, 3, 9))

    def f(chosen, rejected, ref_chosen, ref_rejected):
        refs = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        return preference_loss(
            name, chosen, rejected, **refs, **lengths, beta=0.4, **EXTRA.get(name, {})
        ).losses

    assert torch.autograd.gradcheck(f, logps)


@pytest.mark.parametrize("name", sorted(n for n, s in LOSSES.items() if not s.needs_reference))
def test_reference_free_objectives_ignore_the_reference(name):
    chosen, rejected = t(-4.0, -7.5), t(-12.0, -3.0)
    lengths = dict(chosen_lengths=t(2.0, 5.0), rejected_lengths=t(4.0, 3.0))
    without = preference_loss(name, chosen, rejected, **lengths)
    garbage = preference_loss(
        name, chosen, rejected, t(123.0, float("nan")), ref_rejected_logps=t(-1e9, 0.0), **lengths
    )
    torch.testing.assert_close(without.losses, garbage.losses)
    assert torch.isfinite(without.losses).all()


def test_registry_states_what_each_objective_takes():
    import dataclasses
    import inspect

    from alignkit.config.preference import DPOConfig
    from alignkit.losses.registry import PARAM_CHECKS

    config_fields = {f.name for f in dataclasses.fields(DPOConfig)}
    for name, spec in LOSSES.items():
        keyword = {
            p.name: p
            for p in inspect.signature(spec.fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name != "convex"
        }
        expected = set(spec.params) | set(spec.inputs) | ({"chosen_lengths"} if spec.takes_lengths else set())
        assert set(keyword) == expected, name
        assert set(spec.params) <= config_fields & set(PARAM_CHECKS), name
        assert spec.paper, name
    assert {n for n, s in LOSSES.items() if not s.needs_reference} == {"simpo", "cpo", "orpo"}


def test_missing_inputs_unused_parameters_and_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match="loss 'ipo' needs completion lengths"):
        preference_loss("ipo", **POLICY)
    with pytest.raises(ValueError, match="loss 'cpo' needs completion lengths"):
        preference_loss("cpo", t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="loss 'bco_pair' needs delta"):
        preference_loss("bco_pair", **POLICY)
    with pytest.raises(ValueError, match=r"loss 'ipo' does not use 'label_smoothing' \(it takes: beta\)"):
        preference_loss("ipo", **LENGTHS, label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss 'hinge' does not use 'margin'"):
        preference_loss("hinge", **POLICY, margin=t(1.0))
    with pytest.raises(ValueError, match=r"beta=0 is not valid \(expected a number > 0\)"):
        preference_loss("sigmoid", **POLICY, beta=0)
    with pytest.raises(ValueError, match=r"label_smoothing=0.5 is not valid"):
        preference_loss("robust", **POLICY, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"nll_weight=-1.0 is not valid"):
        preference_loss("rpo", **POLICY, **LENGTH_ARGS, nll_weight=-1.0)


def test_running_mean_is_the_mean_of_all_values_and_round_trips():
    from alignkit.losses import RunningMean

    running = RunningMean()
    running.update(t(1.0, 2.0, 3.0))
    running.update(t(10.0))
    assert running.mean == pytest.approx(4.0) and running.count == 4  # (1 + 2 + 3 + 10) / 4
    restored = RunningMean()
    restored.load_state_dict(running.state_dict())
    restored.update(t(-4.0))
    running.update(t(-4.0))
    assert restored.state_dict() == running.state_dict() and running.mean == pytest.approx(2.4)
