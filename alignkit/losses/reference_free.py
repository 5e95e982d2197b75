"""Reference-free paired objectives: SimPO, CPO, ORPO. Pure functions of the policy's log-probs alone.

No reference model is loaded or run for these (their `LossSpec.needs_reference` is False), which halves the
forward passes of a DPO run. Registered in `alignkit.losses.preference.LOSSES`; docs/objectives.md compares
them. All inputs are (B,): per-sequence log-prob sums, or per-token means where the objective is registered
as length-normalised (`preference_loss` divides before calling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alignkit.losses.types import LossOutput


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO (Meng et al. 2024): loss = −log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ).

    Registered as length-normalised, so the inputs are per-token mean log-probs and the implicit reward is
    r = β·mean log πθ(y|x). γ = `gamma` is the target reward margin in those reward units: the loss keeps
    pushing until r_w − r_l exceeds γ. (TRL's `simpo_gamma` is the same γ; the SimPO paper and code tune
    the ratio γ/β, `gamma_beta_ratio`, so γ = β·ratio: their β = 2, ratio 0.5 is gamma = 1.0 here.)
    """
    chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
) -> LossOutput:
    """CPO (Xu et al. 2024, eq. 3 plus NLL): DPO with a uniform reference, plus NLL on the chosen completion.

        loss = −log σ(β·log πθ(y_w|x) − β·log πθ(y_l|x)) + α·(−log πθ(y_w|x) / |y_w|),    α = `nll_weight`

    The preference term uses sequence log-prob sums; the NLL is the chosen completion's per-token mean.
    """
    chosen_rewards, rejected_rewards = beta * chosen_logps, beta * rejected_logps
    nll = -chosen_logps / chosen_lengths.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards) + nll_weight * nll
    return LossOutput(
        losses, chosen_rewards.detach(), rejected_rewards.detach(), {"nll": float(nll.detach().mean())}
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, accurate everywhere (Mächler 2012): log(−expm1(x)) near 0, log1p(−e^x) below.

    x is clamped to ≤ −1e-6 first, so a completion the policy has learnt to probability 1 gives a large finite
    log-odds, not inf (the gradient through the clamp is then 0).
    """
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO (Hong et al. 2024, eqs. 4 and 7): NLL on chosen plus λ times an odds-ratio preference term.

        odds(y) = P(y) / (1 − P(y)),    P(y) = exp(mean log πθ(y|x))   (per-token mean: length-normalised)
        loss = −mean log πθ(y_w|x) + λ·(−log σ(log odds(y_w) − log odds(y_l))),    λ = `beta`

    `beta` is λ, the weight of the odds-ratio term (as in TRL; the paper uses λ = 0.1). log odds(y) =
    mean log p − log(1 − exp(mean log p)), computed with `log1mexp`. The rewards reported are the log-odds,
    so rewards/margins is the log odds ratio.
    """
    log_odds_chosen = chosen_logps - log1mexp(chosen_logps)
    log_odds_rejected = rejected_logps - log1mexp(rejected_logps)
    log_odds_ratio = log_odds_chosen - log_odds_rejected
    nll = -chosen_logps
    losses = nll - beta * F.logsigmoid(log_odds_ratio)
    metrics = {"nll": float(nll.detach().mean()), "log_odds_ratio": float(log_odds_ratio.detach().mean())}
    return LossOutput(losses, log_odds_chosen.detach(), log_odds_rejected.detach(), metrics)
