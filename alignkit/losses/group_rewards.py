"""What a GRPO step makes of its rewards before the policy loss, beyond the plain advantage estimators of
`losses.policy`: DAPO's soft overlong punishment, DAPO's test for groups that carry no gradient (dynamic
sampling), and GDPO's normalise-then-sum advantage over several reward sources.

Pure functions of tensors. Rewards are laid out prompt-major, (N·G,) with the G = `group_size` completions
of a prompt consecutive, as everywhere in `losses.policy`; several reward terms side by side are (N·G, K).
Standard deviations are unbiased (`torch.std`'s default), as in `losses.policy` and TRL.
"""

from __future__ import annotations

import torch

__all__ = ["normalize_then_sum", "overlong_penalty", "unanimous_groups"]


def overlong_penalty(lengths: torch.Tensor, *, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", §3.4), one reward per completion:

        R_length(y) = 0                                  |y| ≤ L_max − L_cache
                    = ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
                    = −1                                 L_max < |y|

    L_max = `max_length` (generation.max_new_tokens), L_cache = `cache`, 0 < cache ≤ max_length; |y| the
    completion's tokens, the EOS that ends it included. The penalty falls linearly from 0 to −1 over the last
    L_cache tokens of the budget: a completion that hits the budget without an EOS gets −1, one that ends
    within it less the longer it ran. lengths: (N,) -> (N,) float32, added to the rewards before advantages.
    """
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong_penalty: cache={cache} must be in (0, max_length={max_length}]")
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    start = max_length - cache  # L_max − L_cache: the last length without a penalty
    penalty = (start - lengths) / cache
    return torch.where(lengths <= start, torch.zeros_like(penalty), penalty.clamp(min=-1.0))


def unanimous_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) bool: which groups of `group_size` consecutive rows have exactly equal rewards in every column.

    Such a group has advantage 0 under every estimator of `losses.policy` and under `normalize_then_sum`,
    so it carries no policy gradient: DAPO's dynamic sampling (§3.2: the constraint
    0 < |{o_i : is_equivalent(a, o_i)}| < G) drops it. rewards: (N·G,) or (N·G, K) for K reward terms
    (a group is unanimous only when every term is); exact equality, so a group that differs by rounding
    is kept (its advantage is not exactly 0 either)."""
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(-1)
    if rewards.shape[0] % group_size:
        raise ValueError(
            f"unanimous_groups: {rewards.shape[0]} rows are not a whole number of groups of {group_size}"
        )
    grouped = rewards.reshape(-1, group_size, rewards.shape[-1])  # (N, G, K)
    return (grouped == grouped[:, :1]).all(dim=2).all(dim=1)


def normalize_then_sum(
    rewards: torch.Tensor, weights: torch.Tensor, group_size: int, *, eps: float = 1e-4
) -> torch.Tensor:
    """GDPO's advantage (group reward-decoupled normalisation; TRL's `multi_objective_aggregation=
    "normalize_then_sum"`): each reward term z-scored within its group, the weighted sum of those z-scores
    z-scored over the whole batch:

        z_ik = (r_ik − mean_g(r_·k)) / (std_g(r_·k) + eps)      within the group g of completion i
        s_i  = Σ_k w_k · z_ik
        A_i  = (s_i − mean(s)) / (std(s) + eps)                over all N·G completions

    Each term then weighs by its weight, not by its units or spread (a summed score is dominated by its
    widest term, and GRPO's group z-score of the sum cannot undo that); a term constant within a group
    contributes 0 there. Only the weights' ratios matter: the batch z-score removes their common scale.
    rewards: (N·G, K) prompt-major, gathered over processes (the batch statistics are the whole step's);
    weights: (K,). Returns (N·G,) advantages.
    """
    if rewards.dim() != 2 or rewards.shape[-1] != weights.numel():
        raise ValueError(
            f"normalize_then_sum: rewards must be (N·G, K) with K = {weights.numel()} weights, got shape "
            f"{tuple(rewards.shape)}"
        )
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"normalize_then_sum: {rewards.shape[0]} rows are not groups of group_size={group_size} >= 2"
        )
    grouped = rewards.double().reshape(-1, group_size, rewards.shape[-1])  # (N, G, K)
    z = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + eps)
    summed = (z * weights.double()).sum(-1).reshape(-1)  # (N·G,)
    advantages = (summed - summed.mean()) / (summed.std() + eps)
    return advantages.to(torch.float32)
