"""Diffusion-DPO (Wallace et al. 2023): DPO for text-to-image diffusion models, as pure functions.

A diffusion model has no tractable log-likelihood; the paper bounds it with the denoising error. For a pair
(x^w preferred, x^l dispreferred) with prompt c, ONE timestep t ~ U{0..T-1} and ONE noise ε ~ N(0, I) are
drawn and shared by both images; with x_t = α_t·x_0 + σ_t·ε (the scheduler's `add_noise`) and the target y
the scheduler's (ε for ε-prediction, v = α_t·ε − σ_t·x_0 for v-prediction), the per-sample error

    e_θ(x) = mean over C·H·W of (y − f_θ(x_t, t, c))²                       (`denoising_mse`, (B,))

is computed for the policy θ and the frozen reference on both images, and

    Δ = (e_θ^w − e_ref^w) − (e_θ^l − e_ref^l)
    L = −log σ(−β/2 · Δ)                                                     (paper eq. 14)

with the paper's T·ω(λ_t) folded into β. β convention: the ½ is written out, as in the paper and its
reference code (`-0.5 * beta_dpo`, β = 5000 for SD1.5); the diffusers example script
(examples/research_projects/diffusion_dpo) computes −log σ(beta_dpo · (−Δ)) without the ½, so its default
beta_dpo = 2500 is β = 5000 here. Papers report β ~ 2000-5000 for SD1.5.

This is DPO with −e/2 in place of each log-likelihood: log πθ(x)/πref(x) ≈ −(e_θ − e_ref)/2 (times T·ω,
inside β). So the objectives here are alignkit.losses.preference's, called on those surrogates, and the
implicit rewards are β·(−(e_θ − e_ref)/2); nothing of the DPO maths is written twice:

- sigmoid: L = −log σ(β·h) with h = −Δ/2, i.e. the equation above.
- ipo: L = (h − 1/(2β))² (Azar et al. 2023, eq. 17) on the same h: the pair's error gap −Δ is pulled to the
  target 1/β instead of pushed without bound. (The diffusers script's ipo is (−Δ − 1/(2β))², its own β.)

Implicit accuracy is 1 where −Δ > 0 (the policy improved the preferred image more than the other), 0 where
−Δ < 0, and 0.5 on a tie (Δ = 0, e.g. every pair at step 0, when the policy is the reference).
"""

from __future__ import annotations

import torch

from alignkit.losses.preference import ipo_loss, sigmoid_dpo
from alignkit.losses.types import LossOutput

# Keyed by alignkit.config.preference.DIFFUSION_LOSS_NAMES, what diffusion-dpo's `loss` accepts
# (tests/test_config.py checks).
DIFFUSION_LOSSES = {"sigmoid": sigmoid_dpo, "ipo": ipo_loss}


def denoising_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over every non-batch dimension, in float32.

    prediction, target: (N, C, H, W) -> (N,)."""
    squared = (prediction.float() - target.float()).pow(2)
    return squared.mean(dim=tuple(range(1, squared.dim())))


def diffusion_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
) -> LossOutput:
    """The Diffusion-DPO objective `loss` (sigmoid or ipo) on denoising errors (see the module docstring).

    policy_chosen, policy_rejected, reference_chosen, reference_rejected: (B,) per-sample errors
    `denoising_mse` of the policy and the reference on the preferred (w) and dispreferred (l) image of each
    pair, all at that pair's shared t and ε. Returns LossOutput: losses (B,), the implicit rewards
    −β/2·(e_θ − e_ref) of both images (B,) each (detached; their difference is −β/2·Δ), and metrics
    {"accuracy": (B,) 1 / 0 / 0.5 per pair, see `implicit_accuracy`}.
    """
    if loss not in DIFFUSION_LOSSES:
        raise ValueError(f"loss '{loss}' is not one of {', '.join(DIFFUSION_LOSSES)} (Diffusion-DPO)")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    # −e/2 plays the log-likelihood: h = (−e_θ^w/2 + e_ref^w/2) − (−e_θ^l/2 + e_ref^l/2) = −Δ/2.
    out = DIFFUSION_LOSSES[loss](
        -0.5 * policy_chosen,
        -0.5 * policy_rejected,
        -0.5 * reference_chosen,
        -0.5 * reference_rejected,
        beta=beta,
    )
    out.metrics = {"accuracy": implicit_accuracy(out.chosen_rewards, out.rejected_rewards)}
    return out


def implicit_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1.0 where the preferred image's implicit reward is higher, 0.0 where lower, 0.5 on a tie.
    (B,), (B,) -> (B,)."""
    margin = chosen_rewards - rejected_rewards
    return (margin > 0).float() + 0.5 * (margin == 0).float()
