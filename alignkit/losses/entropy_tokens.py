"""High-entropy-token training (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
Effective Reinforcement Learning for LLM Reasoning", arXiv:2506.01939): the policy gradient only through the
top-ρ fraction of a step's completion tokens by entropy, the "forking" tokens:

    J_HighEnt(θ) = E[ 1/Σ_i |o_i| · Σ_i Σ_t 1[H_i,t ≥ τ_ρ] · min(r_i,t·A_i, clip(r_i,t, 1 − ε_low, 1 + ε_high)·A_i) ]

τ_ρ is the entropy above which a fraction ρ of the batch's tokens lie. The normaliser is unchanged (every
token of the step still counts in it): the indicator only zeroes the other tokens' terms, so the loss is
the policy loss times a 0/1 mask, and the aggregation (`losses.policy.aggregate`) is untouched.

The threshold must be one number for the whole step: every micro-batch, minibatch and process, or the
loss would depend on how the step is split (`tests/test_policy_losses.py`, the split-invariance test). So
it is computed once from the rollout's entropies, gathered over processes, before the updates.
"""

from __future__ import annotations

import math

import torch

__all__ = ["entropy_threshold", "high_entropy_mask"]


def entropy_threshold(entropies: torch.Tensor, fraction: float) -> torch.Tensor:
    """τ_ρ: the k-th largest of the step's token entropies, k = ⌈ρ·M⌉ of its M tokens (at least 1), so that
    `high_entropy_mask` keeps the top ρ (more where entropies tie at τ: every token at τ is kept, a rule that
    does not depend on the tokens' order, as a top-k's tie-break would).

    entropies: (M,) the entropies of every counted token of the step (all processes), fraction: ρ in (0, 1].
    Returns a 0-dim tensor; +inf where there is no token (nothing is kept)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"entropy_threshold: fraction={fraction} must be in (0, 1]")
    entropies = entropies.reshape(-1)
    if entropies.numel() == 0:
        return torch.tensor(float("inf"))
    k = max(1, math.ceil(fraction * entropies.numel() - 1e-9))  # (the 1e-9: 0.2 x 10 is 2.0000000000000004)
    return torch.topk(entropies.float(), k).values[-1]


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """(B, T) float 0/1: the tokens of `mask` whose entropy is at least `threshold` (`entropy_threshold` of
    the whole step). entropy, mask: (B, T). Multiply the per-token policy loss by it."""
    return ((entropy.float() >= threshold) & mask.bool()).float()
